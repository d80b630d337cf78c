"""The HTTP control plane (``gpufleet api``): :func:`gpufleet.api.app.create_app` builds the FastAPI app over a
:class:`~gpufleet.control.ControlPlane`; :func:`gpufleet.api.server.serve` runs it with uvicorn.

Importing this package imports neither FastAPI nor uvicorn.
"""
