"""An OpenAI-compatible HTTP front (``moe2-http``) for apps that do not speak MQTT.

``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, streamed by server-sent
events when asked, behind API keys. ``model`` names a moe2 application; each request becomes
one prompt on the MQTT prompt API (``PromptClient``), answered by whichever gateway serves
that application, so the front holds no model and no state beyond its MQTT connection.

    moe2-http --broker-host 10.0.0.2 --api-keys-file /etc/moe2/http-keys --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.chat.completions.create(model="qa", messages=[{"role": "user", "content": "Hi"}])
"""
