"""The chat-completions client against a real local HTTP server: replies, timeouts, garbage, errors, resume."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import cli_fails
from neuronatlas.cli import main
from neuronatlas.errors import NeuronAtlasError
from neuronatlas.explain import ChatEndpoint
from neuronatlas.explain.prompts import EXPLAIN_SYSTEM, JUDGE_SYSTEM
from neuronatlas.explain.simulate import parse_judgements, parse_simulation
from neuronatlas.neuronset import Neuron, NeuronSet, model_info

PHRASE = "words about cats"


class ChatServer:
    """A chat-completions server in a thread. ``mode`` picks how it answers; ``requests`` keeps what it got.

    ok: explanations are PHRASE, simulations give level 7 to tokens holding "a" and 0 to the others,
    judgements (detection, fuzzing) say 1 for examples holding "a" (fuzzing: inside the marks);
    judge_prose / judge_short: judgements as prose / one too few;
    fail_after: HTTP 500 from the explanation request after the first ``explain_first`` on.
    GET /v1/models lists ``models`` (HTTP 404 when None); ``gets`` keeps the paths asked for.
    """

    def __init__(self):
        self.mode, self.delay, self.explain_first, self.requests = "ok", 0.0, 0, []
        self.models, self.gets = ["served-model", "other-model"], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.gets.append(self.path)
                if self.path != "/v1/models" or server.models is None:
                    self.send_error(404, "no such route")
                    return
                listing = {"object": "list", "data": [{"id": name, "object": "model"} for name in server.models]}
                server._send(self, json.dumps(listing).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                try:
                    server.respond(self, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def respond(self, handler, body) -> None:
        mode = self.mode
        explanations = sum(r["body"]["messages"][0]["content"] == EXPLAIN_SYSTEM for r in self.requests)
        if mode == "fail_after" and explanations > self.explain_first:
            mode = "error500"
        if mode == "slow":
            time.sleep(self.delay)
        if mode == "error500":
            handler.send_error(500, "model crashed")
            return
        if mode == "garbage":
            self._send(handler, b"<html>not json</html>")
            return
        if mode == "no_choices":
            self._send(handler, json.dumps({"choices": []}).encode())
            return
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system == JUDGE_SYSTEM:
            content = self._judgements(user, mode)
        else:
            content = PHRASE if system == EXPLAIN_SYSTEM else self._simulation(user, mode)
        self._send(handler, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

    @staticmethod
    def _simulation(user: str, mode: str) -> str:
        count = int(re.search(r"holds exactly (\d+) integers", user).group(1))
        tokens = re.findall(r"^\d+\t(.*)$", user, flags=re.MULTILINE)[:count]
        levels = [7 if "a" in token else 0 for token in tokens]
        if mode == "wrong_count":
            levels = levels[:-1]
        if mode == "prose":
            return "The neuron fires on cats."
        return "```json\n" + json.dumps({"activations": levels}) + "\n```"

    @staticmethod
    def _judgements(user: str, mode: str) -> str:
        examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.MULTILINE)
        fuzzing = "marked <<like this>>" in user
        answers = [int("a" in ("".join(re.findall(r"<<(.*?)>>", text)) if fuzzing else text)) for text in examples]
        if mode == "judge_prose":
            return "Examples 1 and 3 match."
        if mode == "judge_short":
            answers = answers[:-1]
        return "Here you go: " + json.dumps(answers)

    @staticmethod
    def _send(handler, payload: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def small(tiny_llama, corpus_path, tmp_path_factory):
    """A tiny random Llama profiled on the shared test corpus (with exemplars), and a set of 3 neurons."""
    from neuronatlas.profile import ProfileOptions, profile

    root = tmp_path_factory.mktemp("explain-endpoint")
    atlas = profile(str(tiny_llama), corpus_path, root / "atlas", label_field="lang", device="cpu", quiet=True,
                    options=ProfileOptions(max_length=24, top_k=8, doc_sample=0, positions=False))
    NeuronSet("hand", model_info(atlas.meta), [Neuron(0, 3), Neuron(1, 5), Neuron(1, 20)]).save(root / "set.json")
    return {"root": root, "atlas": root / "atlas", "set": root / "set.json"}


def argv(small, server, out, *extra):
    return ["explain", "--atlas", str(small["atlas"]), "--neurons", str(small["set"]), "--explainer", server.url,
            "--explainer-model", "test-model", "--out", str(out), "--top", "4", "--holdout", "2", "--quiet", *extra]


def contract_argv(small, url, out, *extra):
    """The acceptance command line: no model name, no tuning."""
    return ["explain", "--atlas", str(small["atlas"]), "--neurons", str(small["set"]), "--explainer", url,
            "--out", str(out), *extra]


def assert_nothing_written(folder, out):
    """A failed run leaves no output, no partial file and no new folder: ``folder`` (where --out
    points) is as empty as it was."""
    assert not out.exists()
    assert not out.with_name(out.name + ".partial.jsonl").exists()
    assert list(folder.iterdir()) == []


def test_endpoint_end_to_end(small, server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_CHAT_KEY", "secret-123")
    out = tmp_path / "expl.json"
    assert main(argv(small, server, out, "--random", "3", "--api-key-env", "TEST_CHAT_KEY", "--clusters", "2")) == 0
    result = json.loads(out.read_text())
    assert result["explainer"] == result["simulator"] == f"test-model at {server.url}"
    assert [(n["layer"], n["index"]) for n in result["neurons"]] == [(0, 3), (1, 5), (1, 20)]
    assert all(n["explanation"] == PHRASE for n in result["neurons"])
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer secret-123"
    assert first["body"]["model"] == "test-model" and first["body"]["temperature"] == 0
    simulations = [r for r in server.requests if r["body"]["messages"][0]["content"] != EXPLAIN_SYSTEM]
    assert len(simulations) >= 3 * (2 + 3)  # every neuron: its held-out and random exemplars
    assert not out.with_name("expl.json.partial.jsonl").exists()


def test_no_key_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from neuronatlas.explain import open_backend

    backend = open_backend(server.url + "/chat/completions", "m")
    assert backend.explain([(["a", "cat"], [0, 9])]) == PHRASE
    np.testing.assert_array_equal(backend.simulate(PHRASE, ["a", "cat", "dog"]), [7, 7, 0])
    assert "Authorization" not in server.requests[0]["headers"]
    assert server.requests[0]["path"] == "/v1/chat/completions"  # a full URL is used as given


@pytest.mark.parametrize("mode, message", [
    ("garbage", "not JSON"),
    ("no_choices", "without choices[0].message.content"),
    ("error500", "HTTP 500"),
    ("wrong_count", "activations for"),
    ("prose", "not JSON"),
])
def test_bad_replies_are_clear_errors_and_write_nothing(small, server, tmp_path, capsys, mode, message):
    server.mode = mode
    out = tmp_path / "expl.json"
    cli_fails(capsys, argv(small, server, out, "--random", "0"), message, server.url)
    assert_nothing_written(tmp_path, out)
    cli_fails(capsys, argv(small, server, out, "--random", "0"), message)  # the same error again, no "--resume"


def test_timeout_is_a_clear_error(small, server, tmp_path, capsys):
    server.mode, server.delay = "slow", 3.0
    out = tmp_path / "expl.json"
    started = time.monotonic()
    cli_fails(capsys, argv(small, server, out, "--random", "0", "--timeout", "0.5"), "did not answer within 0.5 s")
    assert time.monotonic() - started < 30
    assert_nothing_written(tmp_path, out)


def test_connection_refused_is_a_clear_error(small, tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "expl.json"
    cli_fails(capsys, ["explain", "--atlas", str(small["atlas"]), "--neurons", str(small["set"]),
                       "--explainer", f"http://127.0.0.1:{port}/v1", "--explainer-model", "m", "--out", str(out),
                       "--random", "0", "--quiet"], "cannot reach endpoint", "refused")
    assert_nothing_written(tmp_path, out)
    cli_fails(capsys, contract_argv(small, f"http://127.0.0.1:{port}/v1", out), "cannot reach endpoint", "/v1/models")
    assert_nothing_written(tmp_path, out)


def test_endpoint_without_a_model_name_uses_the_first_listed(small, server, tmp_path, capsys):
    """The contract's command line (no --explainer-model): the model comes from GET /v1/models, is
    named on stderr and in the output, and is the one every chat request asks for."""
    out = tmp_path / "expl.json"
    assert main(contract_argv(small, server.url, out, "--top", "4", "--holdout", "2", "--random", "0")) == 0
    assert f"using served-model at {server.url}" in capsys.readouterr().err
    assert server.gets == ["/v1/models"]
    result = json.loads(out.read_text())
    assert result["explainer"] == result["simulator"] == f"served-model at {server.url}"
    assert all(n["explanation"] == PHRASE for n in result["neurons"])
    assert {r["body"]["model"] for r in server.requests} == {"served-model"}
    quiet = tmp_path / "quiet.json"
    assert main(contract_argv(small, server.url + "/chat/completions", quiet, "--max-neurons", "1", "--random", "0", "--quiet")) == 0
    assert capsys.readouterr().err == ""
    assert server.gets == ["/v1/models"] * 2  # a full chat URL lists the models of its base


@pytest.mark.parametrize("models, message", [(None, "HTTP 404"), ([], "lists no model")])
def test_endpoint_without_a_model_list_is_a_clear_error(small, server, tmp_path, capsys, models, message):
    server.models = models
    out = tmp_path / "expl.json"
    cli_fails(capsys, contract_argv(small, server.url, out), "no model name given", message, "/v1/models", "--explainer-model")
    assert server.requests == []
    assert_nothing_written(tmp_path, out)


def test_out_in_a_missing_folder_is_refused_up_front(small, server, tmp_path, capsys):
    out = tmp_path / "missing" / "deeper" / "expl.json"
    cli_fails(capsys, argv(small, server, out, "--random", "0"), "does not exist", str(out.parent))
    cli_fails(capsys, argv(small, server, tmp_path, "--random", "0"), "is a folder")
    assert server.requests == [] and server.gets == []
    assert list(tmp_path.iterdir()) == []


def test_interrupted_run_resumes(small, server, tmp_path, capsys):
    """The endpoint fails at the second neuron: no output, the first neuron kept; --resume asks only
    for the rest and the result equals an uninterrupted run's."""
    out = tmp_path / "expl.json"
    server.mode, server.explain_first = "fail_after", 1
    cli_fails(capsys, argv(small, server, out, "--random", "0"), "HTTP 500")
    assert not out.exists()
    partial = out.with_name("expl.json.partial.jsonl")
    assert len(partial.read_text().splitlines()) == 2  # header and neuron (0, 3)
    cli_fails(capsys, argv(small, server, out, "--random", "0"), "--resume")
    cli_fails(capsys, argv(small, server, out, "--random", "0", "--top", "5", "--resume"), "options")
    server.mode, server.requests = "ok", []
    assert main(argv(small, server, out, "--random", "0", "--resume")) == 0
    assert sum(r["body"]["messages"][0]["content"] == EXPLAIN_SYSTEM for r in server.requests) == 2
    resumed = json.loads(out.read_text())
    assert not partial.exists()
    whole = tmp_path / "whole.json"
    assert main(argv(small, server, whole, "--random", "0")) == 0
    assert resumed == json.loads(whole.read_text())


def test_endpoint_judges_five_examples_a_request_and_samples_with_temperature(small, server, tmp_path):
    out = tmp_path / "expl.json"
    assert main(argv(small, server, out, "--random", "6", "--samples", "2", "--temperature", "0.9",
                     "--scorers", "fuzzing,detection", "--scoring-contexts", "exemplars")) == 0
    result = json.loads(out.read_text())
    judges = [r for r in server.requests if r["body"]["messages"][0]["content"] == JUDGE_SYSTEM]
    assert judges and all(1 <= r["body"]["messages"][1]["content"].count("\nExample ") <= 5 for r in judges)
    explains = [r["body"] for r in server.requests if r["body"]["messages"][0]["content"] == EXPLAIN_SYSTEM]
    assert len(explains) == 2 * 3 and {b["temperature"] for b in explains} == {0.9}
    seeds = [b["seed"] for b in explains]
    assert all(seeds[i] != seeds[i + 1] for i in range(0, 6, 2))  # each neuron's two samples differ
    for record in result["neurons"]:
        assert len(record["candidates"]) == 2 and set(record["scores"]) == {"fuzzing", "detection"}
        for name, values in record["scores"].items():
            assert values["score"] is None or 0 <= values["score"] <= 1
            assert values["n_activating"] + values["n_non_activating"] == 2 + 6  # held-out and random exemplars
            assert "baseline" in values and "baseline_auc" in values
            assert values["judged_by"] == "answers"  # an endpoint's answers: their AUROC is their balanced accuracy
            assert values["auc"] == pytest.approx(values["score"]) if values["score"] is not None else values["auc"] is None
        assert record["baseline_from"]["explanation"] == PHRASE
        assert record["score"] is None  # no simulation asked for


@pytest.mark.parametrize("mode, message", [("judge_prose", "without a JSON list"), ("judge_short", "judgements for")])
def test_bad_judgements_are_clear_errors(small, server, tmp_path, capsys, mode, message):
    server.mode = mode
    out = tmp_path / "expl.json"
    cli_fails(capsys, argv(small, server, out, "--random", "4", "--scorers", "detection"), message)
    assert_nothing_written(tmp_path, out)


def test_parse_judgements_is_strict():
    assert parse_judgements("```json\n[1, 0, true]\n```", 3, "s") == [True, False, True]
    for reply, message in [("[1, 2]", "other than 0 and 1"), ("[1]", "1 judgements for 2"), ("yes, no", "without"),
                           ('["1", "0"]', "other than")]:
        with pytest.raises(NeuronAtlasError, match=message):
            parse_judgements(reply, 2, "s")


def test_parse_simulation_is_strict():
    np.testing.assert_array_equal(parse_simulation('{"activations": [0, 10, 2.5]}', 3, "s"), [0, 10, 2.5])
    for reply, message in [('{"activations": [0, 11]}', "outside"), ('{"activations": [0, true]}', "outside"),
                           ('{"levels": [0, 1]}', "without"), ('[0, 1]', "without"), ('{"activations": [1]}', "1 activations for 2"),
                           ("0 1", "not JSON")]:
        with pytest.raises(NeuronAtlasError, match=message):
            parse_simulation(reply, 2, "s")


def test_endpoint_options_are_checked():
    with pytest.raises(NeuronAtlasError, match="--timeout"):
        ChatEndpoint("http://127.0.0.1:1/v1", "m", timeout=0)
