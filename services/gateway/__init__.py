"""The gateway: the OpenAI-compatible inference API tenants call (auth, rate limits, load
balancing, proxy to vLLM, usage)."""
