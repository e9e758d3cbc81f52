"""The router's HTTP faces: OpenAI's and Ollama's APIs, the conversations API, the chat
page and /metrics (app), what a peer can hold open (guard), the translations to and from
pichat's protocol (openai, ollama, tools: pure) and embeddings batched (embedbatch).
They reach the router only through `app.RouterFace`; they import policy and observe,
never the daemon."""
