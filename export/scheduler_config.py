"""The scheduler config the runtime uses: the folder's, updated as diffusers' pipeline updates it.

diffusers' StableDiffusionPipeline.__init__ rewrites an outdated scheduler config (folders that
predate these fields): `steps_offset` != 1 becomes 1, and `clip_sample` true becomes false, each
with a deprecation warning. sdrt does the same at export, says so in one warning line, writes the
effective config into the work folder and records it in the manifest, so the torch-free runtime
steps exactly as diffusers does.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from sdrt.engine.scheduler import read_config_json
from sdrt.errors import UserError


def _scheduler_class(name: str | None):
    """The class the folder declares (model_index.json), else DDIM: its defaults fill the keys
    the file leaves out, as `from_pretrained` fills them."""
    import diffusers
    cls = getattr(diffusers, name or "", None)
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        return cls
    return diffusers.DDIMScheduler


def effective_config(scheduler_dir: Path, class_name: str | None, rewrite: bool = True) -> tuple[dict, dict]:
    """(config, updated): the config diffusers' pipeline would run with, and {key: [old, new]}
    for what was rewritten. rewrite False: the pipeline takes the config as it is
    (StableDiffusionUpscalePipeline does not rewrite it)."""
    path = Path(scheduler_dir) / "scheduler_config.json"
    raw = read_config_json(path)
    cls = _scheduler_class(class_name or raw.get("_class_name"))   # needs diffusers: the export extra
    try:
        sched = cls.from_config(raw)
    except Exception as e:  # diffusers raises NotImplementedError, ValueError, TypeError ...
        raise UserError(f"scheduler config {path} is not usable: {str(e).splitlines()[0]}") from None
    config = {k: v for k, v in dict(sched.config).items() if not k.startswith("_")}
    config["_class_name"] = type(sched).__name__
    updated = {}
    if not rewrite:
        return config, updated
    if getattr(sched.config, "steps_offset", 1) != 1:          # as StableDiffusionPipeline.__init__
        updated["steps_offset"] = [sched.config.steps_offset, 1]
    if getattr(sched.config, "clip_sample", False) is True:
        updated["clip_sample"] = [True, False]
    config.update({k: new for k, (_, new) in updated.items()})
    return config, updated


def warn_if_updated(updated: dict) -> None:
    if updated:
        was = ", ".join(f"{k}={json.dumps(old)}" for k, (old, _) in updated.items())
        now = ", ".join(f"{k}={json.dumps(new)}" for k, (_, new) in updated.items())
        warnings.warn(f"the scheduler config is outdated ({was}): using {now}, as diffusers' "
                      "StableDiffusionPipeline does (recorded in manifest.json)", stacklevel=2)
