"""Ask a running `lathe api` server through the official openai client (pip install openai).

    python examples/api_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]

Waits up to two minutes for the server to come up (it loads the model first), then asks one
question plainly, the same one streamed, and one plain-text completion.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request

from openai import OpenAI


def wait_for(base_url: str, seconds: float = 120.0) -> None:
    health = base_url.rsplit("/v1", 1)[0] + "/health"
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(health, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                sys.exit(f"no server answers at {health}; start it with: lathe api examples/api.yaml")
            time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none", help="the server's api_key (any text when it sets none)")
    p.add_argument("--model", default="lathe", help="the server's served_model_name")
    args = p.parse_args()
    wait_for(args.base_url)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    question = [{"role": "user", "content": "Who are you?"}]
    reply = client.chat.completions.create(model=args.model, messages=question)
    print("chat:", reply.choices[0].message.content)
    print("usage:", reply.usage.prompt_tokens, "prompt +", reply.usage.completion_tokens, "completion tokens")
    print("stream: ", end="", flush=True)
    for chunk in client.chat.completions.create(model=args.model, messages=question, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    completion = client.completions.create(model=args.model, prompt="Lathe is", max_tokens=12)
    print("completion:", completion.choices[0].text)


if __name__ == "__main__":
    main()
