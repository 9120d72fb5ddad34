"""The gateway role of an agent: answers mobile clients' prompts by fusing several experts
token by token (paper Algorithm 3). See ``service.Gateway``."""
