"""`vlm_judge`: a vision-language model behind an OpenAI-compatible chat-completions endpoint (vLLM,
sglang, TGI, a hosted API) scores each image with a prompt template and a regex.

    reward.names=[vlm_judge]
    reward.options.vlm_judge.url=http://127.0.0.1:8000/v1  reward.options.vlm_judge.model=Qwen/Qwen2.5-VL-7B-Instruct

Per image: one POST {url}/chat/completions with
    messages = [{"role": "system", "content": system}]                    (when `system` is set)
             + [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}},
                                              {"type": "text", "text": template.format(prompt=…, **metadata)}]}]
    temperature, max_tokens, and seed = a hash of (prompt, PNG) (for servers that honour it: the same
    image gets the same seed however the rows are batched or overlapped)
and the score is float(first match of `pattern` in the reply's text, group 1) · scale. Images are
8-bit PNG (lossless; no JPEG). Requests run `concurrency` at a time; retries, timeout and backoff
as for every service (flowpo.rewards.service).

An unreadable reply (no match, or a match that is not a number) is handled by `on_unreadable`:
`error` stops the run with a line quoting the reply; `value` scores it `unreadable_value`. Either
way the share of unreadable replies is logged as reward/<name>/unreadable.
"""
from __future__ import annotations

import os
import re
import string
from concurrent.futures import ThreadPoolExecutor

import torch

from flowpo.rewards import RewardError
from flowpo.rewards.loading import RewardOptionError
from flowpo.rewards.client import Client
from flowpo.rewards.service import RewardServiceError, encode_png

DEFAULT_TEMPLATE = ("Does this image match the text \"{prompt}\"? Rate the match and the image quality from 0 "
                    "(not at all) to 10 (perfectly). Reply with the number only.")


def reply_text(reply, url: str) -> str:
    """The text of an OpenAI-style chat completion (content as a string or a list of text parts)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RewardServiceError(f"{url}: malformed reply: no choices[0].message.content in {str(reply)[:160]!r}; "
                                 "is this an OpenAI-compatible chat-completions endpoint?") from None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        return ""
    if not isinstance(content, str):
        raise RewardServiceError(f"{url}: malformed reply: message.content is {type(content).__name__}")
    return content


class VLMJudge:
    def __init__(self, url: str = "", model: str = "", template: str = DEFAULT_TEMPLATE,
                 pattern: str = r"(-?\d+(?:\.\d+)?)", scale: float = 0.1, system: str = "",
                 on_unreadable: str = "error", unreadable_value: float = 0.0, max_tokens: int = 16,
                 temperature: float = 0.0, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0, max_reply_mb: float = 64.0,
                 follow_redirects: bool = False):
        """url: the API base (…/v1); model: the served model's name; template: the user text,
        with {prompt} and any metadata field as {field}; pattern: a regex whose group 1 (or whole
        match) is the score; scale: multiplies it (0.1: a 0–10 rating → 0–1); on_unreadable:
        error | value; api_key_env: the environment variable holding the key (sent as a Bearer
        token when set); timeout_s, retries, backoff_s, max_reply_mb, follow_redirects: one
        request's limits, as for `remote` (flowpo.rewards.client.Client)."""
        if not url or not model:
            raise RewardOptionError("reward 'vlm_judge' needs reward.options.<name>.url=http://HOST:PORT/v1 and "
                                    "reward.options.<name>.model=<the served model name>")
        if on_unreadable not in ("error", "value"):
            raise RewardOptionError(f"reward 'vlm_judge': on_unreadable={on_unreadable!r}; choose error or value")
        try:
            self.regex = re.compile(pattern, re.S)
        except re.error as e:
            raise RewardOptionError(f"reward 'vlm_judge': pattern={pattern!r} is not a regex ({e})") from None
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        if "prompt" not in fields:
            raise RewardOptionError("reward 'vlm_judge': the template has no {prompt} field; the judge would not "
                                    "see the text it rates")
        if concurrency < 1:
            raise RewardOptionError(f"reward 'vlm_judge': concurrency={concurrency} must be >= 1")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        try:
            self.client = Client(url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                                 what="the VLM judge", headers={"Authorization": f"Bearer {key}"} if key else None,
                                 max_reply_mb=max_reply_mb, follow_redirects=follow_redirects)
        except ValueError as e:
            raise RewardOptionError(f"reward 'vlm_judge': {e}") from None
        self.model, self.template, self.system, self.scale = model, template, system, scale
        self.on_unreadable, self.unreadable_value = on_unreadable, unreadable_value
        self.max_tokens, self.temperature, self.concurrency = max_tokens, temperature, concurrency

    def _text(self, prompt: str, meta: dict) -> str:
        try:
            return self.template.format_map({**meta, "prompt": prompt})
        except (KeyError, IndexError, ValueError) as e:
            raise RewardOptionError(f"reward 'vlm_judge': the template needs field {e} which this prompt's metadata "
                                    f"lacks (prompt {prompt[:60]!r}); fix the template or the prompt file") from None

    def _one(self, image: torch.Tensor, prompt: str, meta: dict) -> tuple[float, bool]:
        import hashlib

        png = encode_png(image)
        seed = int.from_bytes(hashlib.sha256((prompt + "\0" + png).encode()).digest()[:4], "little") >> 1
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}},
            {"type": "text", "text": self._text(prompt, meta)}]})
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "seed": seed}
        text = reply_text(self.client.call("POST", "/chat/completions", json_body=body),
                          self.client.url + "/chat/completions")
        m = self.regex.search(text)
        try:
            found = (m.group(1) if m.groups() else m.group(0)) if m else None
            return float(found if found is not None else "") * self.scale, False
        except ValueError:
            if self.on_unreadable == "error":
                raise RewardError(f"the VLM judge's reply {text[:120]!r} has no score matching pattern "
                                  f"{self.regex.pattern!r} (prompt {prompt[:60]!r}); fix the template/pattern, or set "
                                  "on_unreadable=value to score such replies unreadable_value") from None
            return self.unreadable_value, True

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict:
        for i, p in enumerate(prompts):  # a template field missing from the metadata: before any request
            self._text(p, metadata[i])
        n = images.shape[0]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, n)), thread_name_prefix="flowpo-judge")
        futures = [pool.submit(self._one, images[i], prompts[i], metadata[i]) for i in range(n)]
        try:
            out = [f.result() for f in futures]
        except BaseException:
            # stop now: queued requests are cancelled and the ones in flight are not waited for, so one
            # failure costs one request's worst case (the remote client's bound), not concurrency of them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return {"scores": torch.tensor([s for s, _ in out]), "unreadable": torch.tensor([float(u) for _, u in out])}
