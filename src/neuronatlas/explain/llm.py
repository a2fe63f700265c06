"""Explainer and simulator backends: a local Hugging Face causal LM, or an OpenAI-compatible chat endpoint.

Both offer ``explain(excerpts) -> str`` (the raw reply; :func:`..explain.explain` cleans it),
``explain_samples`` (N replies at a temperature), ``simulate(explanation, tokens) -> (T,) array`` of
activations 0-10 and ``simulate_many`` (several excerpts), ``judge(explanation, texts, task)`` (yes
or no per text: detection, fuzzing), and a ``name`` for the output.
Nothing is sent over the network unless a URL is given.
"""

from __future__ import annotations

import http.client
import inspect
import json
import os
import socket
import urllib.error
import urllib.request

import numpy as np
import torch

from ..errors import NeuronAtlasError
from ..hooks import forward_batch, pad_token_id
from ..loading import load_config, load_tokenizer, load_weights, max_positions, resolve_device, resolve_dtype
from ..models import is_encoder
from .prompts import (
    EXPLAIN_SYSTEM, JUDGE_SYSTEM, SIMULATE_SYSTEM, SLOT, Excerpt, chat_judge_prompt, chat_simulation_prompt,
    explanation_prompt, judge_prompt, show_token, simulation_intro,
)
from .simulate import expected_levels, number_token_ids, parse_judgements, parse_simulation

CHAT_BATCH = 5  # texts per judging request to an endpoint (delphi shows 5 examples per prompt)


class LocalModel:
    """A causal LM on this machine. Explains by greedy generation (or samples N in one call);
    simulates all at once (one prompt per excerpt, or per chunk of it when the prompt is longer than
    the model's context); judges by the next-token log-odds of Yes and No. Up to ``batch_size`` prompts
    share a padded forward pass."""

    def __init__(self, name_or_path: str, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 24,
                 trust_remote_code: bool = False, quiet: bool = False, batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        config = load_config(name_or_path, trust_remote_code)  # a clear error for a wrong path or id
        self.name = str(name_or_path)
        if is_encoder(config):
            raise _not_causal(self.name)
        try:
            self.model = load_weights(AutoModelForCausalLM, name_or_path, config, resolve_dtype(dtype),
                                      trust_remote_code, quiet).to(resolve_device(device)).eval()
        except (ValueError, OSError):  # a family without a causal LM class, or no weights for one
            raise _not_causal(self.name) from None
        self.device = next(self.model.parameters()).device
        _check_attends_back_only(self.model, self.device, self.name)
        try:
            self.tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        except (ValueError, OSError) as error:
            raise NeuronAtlasError(f"cannot load the tokenizer of {self.name} ({_first_line(error)}); give a folder that holds its tokenizer") from None
        self.context = max_positions(self.model.config)  # None: no known limit
        self.max_new_tokens, self.batch_size = max_new_tokens, max(1, batch_size)
        self.pad = pad_token_id(self.tokenizer)
        self.yes, self.no = answer_token_ids(self.tokenizer, self._answer_ids)
        self.numbers = number_token_ids(self.tokenizer, "\t")
        self.tab, self.slot_line = self._ids("\t"), self._ids(SLOT + "\n")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- explain

    def explain(self, excerpts: list[Excerpt]) -> str:
        return self.explain_samples(excerpts, 1, 0.0)[0]

    def explain_samples(self, excerpts: list[Excerpt], count: int, temperature: float, seed: int = 0) -> list[str]:
        """``count`` replies: greedy when ``temperature`` is 0, else sampled, all in one generate call."""
        prompt = self._fitting_prompt(excerpts)
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, pad_token_id=self.pad,
                                         num_return_sequences=count if temperature > 0 else 1, **sampling)
        replies = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return replies if temperature > 0 else replies * count

    def _fitting_prompt(self, excerpts: list[Excerpt]) -> str:
        """The prompt with as many excerpts as fit the context; a lone excerpt too long is cut around its peak."""
        if self.context is None:
            return explanation_prompt(excerpts)
        budget = self.context - self.max_new_tokens
        # Counted piecewise (each excerpt's lines start after a newline) so no over-long text is tokenised.
        length = self._length(explanation_prompt([]))
        count = 0
        while count < len(excerpts):
            length += self._length(explanation_prompt(excerpts[count:count + 1])) - self._length(explanation_prompt([]))
            if length > budget:
                break
            count += 1
        while count > 0:
            prompt = explanation_prompt(excerpts[:count])
            if self._length(prompt) <= budget:
                return prompt
            count -= 1
        tokens, levels = excerpts[0]
        peak = int(np.argmax(levels))
        for half in range(len(tokens) // 2, -1, -1):
            lo, hi = max(peak - half, 0), peak + half + 1
            prompt = explanation_prompt([(tokens[lo:hi], levels[lo:hi])])
            if self._length(prompt) <= budget:
                return prompt
        raise NeuronAtlasError(
            f"the explainer {self.name} has a context of {self.context} tokens, too short for the prompt and "
            f"{self.max_new_tokens} new tokens; use a model with a longer context"
        )

    def _length(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    # ---- simulate

    def simulate(self, explanation: str, tokens: list[str]) -> np.ndarray:
        return self.simulate_many(explanation, [tokens])[0]

    def simulate_many(self, explanation: str, excerpts: list[list[str]]) -> list[np.ndarray]:
        """Each excerpt's (T,) simulated activations; the prompts of several excerpts (or chunks of a
        long one) share a padded forward pass of up to ``batch_size`` rows."""
        prefix = self.tokenizer(simulation_intro(explanation))["input_ids"]
        rows, owners = [], []
        for number, tokens in enumerate(excerpts):
            lines = [self._ids(show_token(token)) + self.tab for token in tokens]  # each followed by its slot
            for chunk in self._chunks(prefix, lines):
                rows.append(self._slotted(prefix, chunk))
                owners.append(number)
        values = []
        for start in range(0, len(rows), self.batch_size):
            values += self._run_slots(rows[start:start + self.batch_size])
        parts: list[list[np.ndarray]] = [[] for _ in excerpts]
        for owner, value in zip(owners, values):
            parts[owner].append(value)
        return [np.concatenate(part) for part in parts]

    def _chunks(self, prefix: list[int], lines: list[list[int]]) -> list[list[list[int]]]:
        """Consecutive lines grouped so that prefix + group fits the context."""
        chunks: list[list[list[int]]] = [[]]
        length = len(prefix)
        for line in lines:
            size = len(line) + len(self.slot_line)
            if self.context is not None and length + size > self.context:
                if not chunks[-1]:
                    raise NeuronAtlasError(
                        f"the simulator {self.name}'s context of {self.context} tokens cannot hold the explanation "
                        "and one token line; use a model with a longer context"
                    )
                chunks.append([])
                length = len(prefix)
            chunks[-1].append(line)
            length += size
        return chunks

    def _slotted(self, prefix: list[int], lines: list[list[int]]) -> tuple[list[int], list[int]]:
        """(ids, slots): the prompt of one chunk and the positions whose logits predict each level."""
        ids, slots = list(prefix), []
        for line in lines:
            ids += line
            slots.append(len(ids) - 1)  # the tab: its logits predict what fills the slot
            ids += self.slot_line
        return ids, slots

    def _run_slots(self, rows: list[tuple[list[int], list[int]]]) -> list[np.ndarray]:
        """Expected levels at the slots of several prompts, right-padded into one (B, T) batch."""
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, _) in enumerate(rows):
            input_ids[row, :len(ids)], mask[row, :len(ids)] = torch.tensor(ids), 1
        with torch.inference_mode():
            logits = forward_batch(self.model, input_ids.to(self.device), mask.to(self.device)).logits  # (B, T, V)
            return [expected_levels(logits[row, slots], self.numbers) for row, (_, slots) in enumerate(rows)]

    # ---- judge (detection, fuzzing)

    def judge(self, explanation: str, texts: list[str], task: str) -> list[bool]:
        """Yes or no for each text: whether the next-token probability of Yes exceeds that of No."""
        return (self.judge_log_odds(explanation, texts, task) > 0).tolist()

    def judge_log_odds(self, explanation: str, texts: list[str], task: str) -> np.ndarray:
        """(N,) log p(Yes) - log p(No) of the next token after each text's judging prompt, each side
        summed over its case and space variants; prompts of similar length share a left-padded
        forward pass of up to ``batch_size`` rows."""
        prompts = [self._judge_ids(judge_prompt(explanation, text, task)) for text in texts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
        odds = np.zeros(len(prompts))
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            odds[rows] = self._last_log_odds([prompts[i] for i in rows])
        return odds

    def _last_log_odds(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):], mask[row, width - len(ids):] = torch.tensor(ids), 1
        keep = {"logits_to_keep": 1} if _takes(self.model, "logits_to_keep") else {}  # no (B, T, V) logits
        with torch.inference_mode():
            logits = forward_batch(self.model, input_ids.to(self.device), mask.to(self.device), **keep).logits[:, -1].float()  # (B, V)
        log_probs = torch.log_softmax(logits, dim=-1)
        yes = torch.logsumexp(log_probs[:, self.yes], dim=-1)  # (B,)
        no = torch.logsumexp(log_probs[:, self.no], dim=-1)
        return (yes - no).cpu().numpy()

    def _judge_text(self, prompt: str) -> str:
        """The prompt as a chat turn when the tokenizer has a chat template, else followed by "Answer:"."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt + "\nAnswer:"

    def _encode_judging(self, text: str) -> list[int]:
        """A chat-template text holds its special tokens already; a plain prompt gets the tokenizer's."""
        return self._ids(text) if getattr(self.tokenizer, "chat_template", None) else self.tokenizer(text)["input_ids"]

    def _answer_ids(self, word: str) -> list[int] | None:
        """The ids ``word`` adds right after a judging prompt, or None when it changes the prompt's ids."""
        prompt = self._encode_judging(self._judge_text("Is it?"))
        ids = self._encode_judging(self._judge_text("Is it?") + word)
        return ids[len(prompt):] if ids[:len(prompt)] == prompt and len(ids) > len(prompt) else None

    def _judge_ids(self, prompt: str) -> list[int]:
        ids = self._encode_judging(self._judge_text(prompt))
        if self.context is not None and len(ids) > self.context:
            raise NeuronAtlasError(f"the scorer {self.name}'s context of {self.context} tokens cannot hold a judging prompt "
                                   f"of {len(ids)} tokens; use --context smaller or a model with a longer context")
        return ids


class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint (POST {base}/chat/completions).

    Without a model name it uses the first model the endpoint lists (GET {base}/models);
    ``discovered`` then says so.
    """

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        if timeout <= 0:
            raise NeuronAtlasError(f"--timeout must be positive (got {timeout})")
        base = url.rstrip("/").removesuffix("/chat/completions")
        self.url = base + "/chat/completions"
        self.api_key, self.timeout = api_key, timeout
        self.discovered = not model
        self.model = model or self._first_listed_model(base + "/models")
        self.name = f"{self.model} at {url}"

    def _first_listed_model(self, models_url: str) -> str:
        """The ``id`` of the first entry of the endpoint's model list ({"data": [{"id": ...}, ...]})."""
        hint = "pass --explainer-model (or --simulator-model)"
        try:
            data = _reply_json(self._request(models_url), models_url)
        except NeuronAtlasError as error:
            raise NeuronAtlasError(f"no model name given and listing the endpoint's models failed ({error}); {hint}") from None
        try:
            model = data["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            model = None
        if not isinstance(model, str) or not model:
            raise NeuronAtlasError(f'no model name given and {models_url} lists no model (expected {{"data": [{{"id": ...}}]}}); {hint}')
        return model

    def explain(self, excerpts: list[Excerpt]) -> str:
        return self.chat(EXPLAIN_SYSTEM, explanation_prompt(excerpts), max_tokens=60)

    def explain_samples(self, excerpts: list[Excerpt], count: int, temperature: float, seed: int = 0) -> list[str]:
        """``count`` replies, one request each, at ``temperature`` (0: one request, repeated)."""
        prompt = explanation_prompt(excerpts)
        if temperature <= 0:
            return [self.chat(EXPLAIN_SYSTEM, prompt, max_tokens=60)] * count
        return [self.chat(EXPLAIN_SYSTEM, prompt, max_tokens=60, temperature=temperature, seed=seed + i) for i in range(count)]

    def simulate_many(self, explanation: str, excerpts: list[list[str]]) -> list[np.ndarray]:
        return [self.simulate(explanation, tokens) for tokens in excerpts]

    def judge(self, explanation: str, texts: list[str], task: str) -> list[bool]:
        """Yes or no for each text, ``CHAT_BATCH`` texts a request, each answered by a JSON list of 0/1."""
        answers: list[bool] = []
        for start in range(0, len(texts), CHAT_BATCH):
            batch = texts[start:start + CHAT_BATCH]
            reply = self.chat(JUDGE_SYSTEM, chat_judge_prompt(explanation, batch, task), max_tokens=4 * len(batch) + 20)
            answers += parse_judgements(reply, len(batch), self.name)
        return answers

    def simulate(self, explanation: str, tokens: list[str]) -> np.ndarray:
        reply = self.chat(SIMULATE_SYSTEM, chat_simulation_prompt(explanation, tokens), max_tokens=8 * len(tokens) + 50)
        return parse_simulation(reply, len(tokens), self.name)

    def chat(self, system: str, user: str, max_tokens: int, temperature: float = 0.0, seed: int | None = None) -> str:
        """The content of the first choice's message."""
        body = {"model": self.model, "temperature": temperature, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        if seed is not None:
            body["seed"] = seed
        data = _reply_json(self._request(self.url, json.dumps(body).encode()), self.url)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise NeuronAtlasError(f"endpoint {self.url} answered JSON without choices[0].message.content; is it an OpenAI-compatible chat endpoint?")
        return content

    def _request(self, url: str, body: bytes | None = None) -> bytes:
        """The reply's body: POST ``body`` as JSON, or GET when there is none."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = " ".join(error.read(200).decode("utf-8", "replace").split())
            raise NeuronAtlasError(f"endpoint {url} answered HTTP {error.code} ({detail or error.reason}); check the URL, model name and key") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise self._timed_out(url) from None
            raise NeuronAtlasError(f"cannot reach endpoint {url} ({error.reason}); check the URL and that the server is running") from None
        except (TimeoutError, socket.timeout):
            raise self._timed_out(url) from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise NeuronAtlasError(f"the connection to endpoint {url} failed ({type(error).__name__}: {error}); check the server") from None

    def _timed_out(self, url: str) -> NeuronAtlasError:
        return NeuronAtlasError(f"endpoint {url} did not answer within {self.timeout:g} s; raise --timeout or check the server")


def _not_causal(name: str) -> NeuronAtlasError:
    return NeuronAtlasError(f"{name} is not a causal language model; give a decoder model folder or an endpoint URL")


def _check_attends_back_only(model, device: torch.device, name: str) -> None:
    """Changing the last token must leave the logits of the positions before it as they were. An
    encoder of a family neuronatlas does not know that loads with a language-model head attends both
    ways and fails."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(1, 5, device=device) % vocab  # (4,)
    changed = ids.clone()
    changed[-1] = (ids[-1] + 1) % vocab
    with torch.inference_mode():
        logits = model(torch.stack([ids, changed])).logits[:, :-1].float()  # (2, 3, V)
    if (logits[0] - logits[1]).abs().max() > 1e-3 * logits.abs().max().clamp_min(1e-6):
        raise _not_causal(name)


def _takes(model, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _reply_json(raw: bytes, url: str) -> dict:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        preview = " ".join(raw[:60].decode("utf-8", "replace").split())
        raise NeuronAtlasError(f"endpoint {url} answered something that is not JSON ({preview!r}); is it an OpenAI-compatible chat endpoint?") from None


YES_WORDS, NO_WORDS = ("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no")


def answer_token_ids(tokenizer, after=None) -> tuple[list[int], list[int]]:
    """The first token ids of Yes and of No, capitalised or not, with and without a space before:
    each as encoded alone and, when ``after(word)`` gives them, as the ids the word adds right
    after a judging prompt (None when the prompt's own ids change)."""
    def first_ids(words: tuple[str, ...]) -> set[int]:
        found = set()
        for word in words:
            for ids in (tokenizer(word, add_special_tokens=False)["input_ids"], after(word) if after else None):
                if ids:
                    found.add(ids[0])
        return found

    yes, no = first_ids(YES_WORDS), first_ids(NO_WORDS)
    if not yes or not no or yes & no:
        raise NeuronAtlasError("the scorer's tokenizer does not write Yes and No as distinct tokens; use another scorer model")
    return sorted(yes), sorted(no)


def is_endpoint(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_backend(spec: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 24,
                 trust_remote_code: bool = False, quiet: bool = False, batch_size: int = 8):
    """A ChatEndpoint for an http(s) URL (key from the environment variable ``api_key_env``; without
    ``model``, the first the endpoint lists), else a LocalModel."""
    if is_endpoint(spec):
        return ChatEndpoint(spec, model, os.environ.get(api_key_env) or None, timeout)
    return LocalModel(spec, device=device, dtype=dtype, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
                      quiet=quiet, batch_size=batch_size)
