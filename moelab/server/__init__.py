"""The OpenAI-compatible HTTP server (`moelab serve`): app.py builds it, serve.py runs it."""
