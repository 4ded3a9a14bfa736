"""The web UI's API subset (filled in below)."""
from fastapi import APIRouter

router = APIRouter(tags=["webui"])
