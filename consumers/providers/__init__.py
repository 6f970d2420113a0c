"""LLM providers: OpenAI (and any OpenAI-compatible base_url), Anthropic."""
