"""lowvox's HTTP server (FastAPI + uvicorn).

- `app.py`: `create_app(settings)` and `serve(settings)`; lifespan, middleware, routers.
- `engines.py`: the engines a server runs, each owned by a `server.scheduler.Scheduler`.
- `synthesis.py`: request -> validated plan -> queued job -> whole or streamed audio.
- `routes/`: one module per API family (OpenAI, AllTalk, xtts-api-server, voice library,
  readiness/outputs, the web page); `static/` holds the page itself.
- `outputs.py`, `security.py`, `errors.py`, `narration.py`: outputs folder, API key and
  body limit, error answers, AllTalk's narrator.
"""
