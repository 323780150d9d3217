"""The HTTP service: a Litestar app over one answering stack and one model worker.

`serve.app.create_app(ServeSettings(...))` builds the app; its lifespan loads the stack, starts the
worker and, on shutdown, lets in-flight requests finish and flushes the cache's disk tier.
`ragcache serve` runs it under uvicorn. (Nothing is imported here, so the CLI stays fast to start.)
"""
