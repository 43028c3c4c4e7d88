"""HTTP API (AUTOMATIC1111-compatible subset plus our own routes) and the web page.

- `app.py`: `create_app(pipeline_factory, settings) -> FastAPI`; routes, error mapping (422 names the field,
  503 when the queue is full or the server stops, 500 when a job fails inside the engine).
- `worker.py`: the one thread that owns the pipeline, fed by a bounded queue; interrupt and clean shutdown.
- `a1111.py`: A1111 request/response schemas, the A1111 -> our sampler/scheduler table, image decoding.
- `own.py`: /api/generate (per-token attention heatmaps) and /api/encode (conditioning statistics).
- `tokens.py`: the per-token report behind /api/tokenize and the page's live counter.
- `middleware.py`: HTTP basic auth and the request body limit, in front of every route.
- `settings.py`: `ServerSettings` (listed models, limits, auth); `cli.py`: `clipdiffusion serve`.
- `static/`: the page (plain HTML/CSS/JS).

Importing this package does nothing; torch is imported only when the worker loads a model.
"""
