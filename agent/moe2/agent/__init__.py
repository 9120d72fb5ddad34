"""moe2 edge agent: serves one GGUF model's next-token distributions over MQTT."""

__version__ = "0.1.0"
