"""`remote`: a scorer served by `flowpo serve-reward` (or any server speaking protocol 1,
flowpo.rewards.service) on another process, GPU or machine.

    reward.names=[remote@geneval, remote@judge]
    reward.options.remote@geneval.url=http://127.0.0.1:8765
    reward.options.remote@judge.url=http://10.0.0.2:8765  reward.options.remote@judge.reward=unified

At construction the service's /v1/health is read (one clear error before any rollout when it is
down, speaks another protocol, or does not serve `reward`). Each call posts one safetensors body
(images as `dtype`, prompts and metadata as JSON) per `batch_size` images and reads JSON scores
plus optional per-image detail fields, which the trainer logs as reward/<name>/<field>.

What the service can do to the trainer is bounded (flowpo.rewards.client.Client): timeout_s
bounds each attempt whole (a server trickling its reply cannot hold it longer), a reply over
max_reply_mb is refused while it streams, and a redirect is followed only when follow_redirects
is set and it stays on the url's scheme, host and port.
"""
from __future__ import annotations

from urllib.parse import quote

import torch

from flowpo.rewards.loading import RewardOptionError
from flowpo.rewards.client import START_HINT, Client
from flowpo.rewards.service import PROTOCOL, SAFETENSORS, WIRE_DTYPES, decode_reply, encode_request


class Remote:
    def __init__(self, url: str = "", reward: str = "", dtype: str = "uint8", timeout_s: float = 120.0,
                 retries: int = 3, backoff_s: float = 1.0, max_reply_mb: float = 64.0, follow_redirects: bool = False):
        """url: the service's base URL (http://HOST:PORT); reward: the name it serves the scorer
        under (empty: the only one it serves); dtype: uint8 (the PNG/PIL image, 4× smaller) |
        float16 | float32 (the decoder's values exactly); timeout_s: one attempt as a whole
        (connect, send, the full reply); retries on a connection error, timeout or 5xx with
        backoff_s·2^k between attempts; max_reply_mb: the largest reply read (MiB), refused while
        streaming; follow_redirects: follow a redirect to the same scheme, host and port (others
        are always refused)."""
        if not url:
            raise RewardOptionError("reward 'remote' needs reward.options.<name>.url=http://HOST:PORT (a service "
                                    "started with flowpo serve-reward)")
        if dtype not in WIRE_DTYPES:
            raise RewardOptionError(f"reward 'remote': dtype={dtype!r} is not allowed; choose {', '.join(WIRE_DTYPES)}")
        try:
            self.client = Client(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                 what="the reward service", max_reply_mb=max_reply_mb,
                                 follow_redirects=follow_redirects)
        except ValueError as e:
            raise RewardOptionError(f"reward 'remote': {e}") from None
        self.dtype = dtype
        health = self.client.call("GET", "/v1/health", hint=START_HINT)
        served = health.get("rewards") if isinstance(health, dict) else None
        if not isinstance(served, list) or health.get("protocol") != PROTOCOL:  # a wrong URL: bad input
            raise RewardOptionError(f"{url} answered /v1/health with {str(health)[:120]!r}: not a flowpo reward "
                                     f"service of protocol {PROTOCOL}; check the URL (and update flowpo on both sides)")
        if not reward:
            if len(served) != 1:
                raise RewardOptionError(f"the service at {url} serves {served}; choose one with "
                                        "reward.options.<name>.reward=NAME")
            reward = served[0]
        elif reward not in served:
            raise RewardOptionError(f"the service at {url} does not serve {reward!r}; it serves {served} "
                                    "(reward.options.<name>.reward)")
        self.reward = reward
        self.path = "/v1/score/" + quote(reward, safe="")

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict:
        body = encode_request(images, prompts, metadata, self.dtype)
        reply = self.client.call("POST", self.path, data=body, content_type=SAFETENSORS)
        scores, detail = decode_reply(reply, images.shape[0], self.client.url + self.path)
        return {"scores": scores, **detail}
