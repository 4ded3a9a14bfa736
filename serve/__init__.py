"""`sdrt serve`: HTTP serving above the runtime (sdrt.engine). The runtime never imports this
package. One engine worker thread owns the Pipeline; the HTTP side only talks to the scheduler."""
