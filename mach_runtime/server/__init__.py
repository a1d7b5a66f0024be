"""mach-serve: the OpenAI- and Anthropic-compatible HTTP server over the async Runtime (FastAPI + uvicorn).

``production_app.create_app(settings)`` builds the ASGI app (one Runtime per process, opened in the app's
lifespan); ``mach_runtime.cli.serve`` is the ``mach-serve`` command. Importing this package needs the
``server`` extra (``pip install 'mach-runtime[server]'``).
"""
