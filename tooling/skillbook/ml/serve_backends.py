"""Generation backends behind the OpenAI-compatible app, and the `vllm serve` command line.

A backend knows its model id and context size, counts tokens, renders a chat into a prompt with
the model's own chat template, and streams generated text as pieces. Stop strings and the HTTP
protocol live in serve_app.py, so every backend honours them the same way. Each backend holds a
lock: one generation at a time per model (llama.cpp contexts and a CPU torch model are not
re-entrant); concurrent requests queue, which is what the load test measures.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sampling:
    """Sampling parameters every backend honours (OpenAI names; top_k is the llama.cpp/vLLM extension)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Piece:
    """A chunk of generated text; `finish_reason` is set on the last one ("stop" or "length")."""

    text: str
    finish_reason: str | None = None


class Backend:
    """Interface: model_id, n_ctx, count_tokens(), chat_prompt(), generate()."""

    model_id: str
    n_ctx: int
    name: str = "base"

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def chat_prompt(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def generate(self, prompt: str, sp: Sampling) -> Iterator[Piece]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (called after the server stopped)."""


def _render_template(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """Render a HF chat template (sandboxed jinja2, as transformers does) with a generation prompt."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant tokens for training masks; render it as-is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


class LlamaCppBackend(Backend):
    """A GGUF file through llama-cpp-python's Llama class (CPU)."""

    name = "llama-cpp"

    def __init__(self, gguf_path: Path, n_ctx: int = 0, n_threads: int = 2, model_id: str | None = None):
        super().__init__()
        from llama_cpp import Llama

        # n_threads explicitly: Llama() defaults to half the cores. n_ctx=0 takes the model's trained context.
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_batch=512,
            seed=0,
            verbose=False,
            logits_all=False,
        )
        meta = self.llm.metadata
        trained = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 0)) or self.llm.n_ctx()
        # llama.cpp rounds the context up (to 256); requests are checked against what the model was trained on
        self.n_ctx = min(self.llm.n_ctx(), trained) if n_ctx == 0 else self.llm.n_ctx()
        self.model_id = model_id or Path(gguf_path).stem
        self.template = meta.get("tokenizer.chat_template")
        self.bos = self._token_text(meta.get("tokenizer.ggml.bos_token_id"))
        self.eos = self._token_text(meta.get("tokenizer.ggml.eos_token_id"))

    def _token_text(self, tid: str | None) -> str:
        if tid is None:
            return ""
        return self.llm.detokenize([int(tid)], special=True).decode("utf-8", errors="replace")

    def close(self) -> None:
        # free the llama.cpp context now: freeing it at interpreter exit prints a spurious traceback
        with self.lock:
            self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        # special=True: template markers such as <|bos|> in a rendered chat become their control tokens
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def chat_prompt(self, messages: list[dict]) -> str:
        if not self.template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return _render_template(self.template, messages, self.bos, self.eos)

    def generate(self, prompt: str, sp: Sampling) -> Iterator[Piece]:
        tokens = self.tokenize(prompt) or [self.llm.token_bos()]
        with self.lock:
            stream = self.llm.create_completion(
                tokens,
                max_tokens=sp.max_tokens,
                temperature=sp.temperature,
                top_p=sp.top_p,
                top_k=sp.top_k,
                seed=sp.seed,
                stream=True,
                repeat_penalty=1.0,
                min_p=0.0,
            )
            assert not isinstance(stream, dict)  # stream=True: an iterator of chunks, not one response
            for chunk in stream:
                choice = chunk["choices"][0]
                yield Piece(choice["text"], choice.get("finish_reason"))


class TransformersBackend(Backend):
    """Any hf-model through transformers generate() with a TextIteratorStreamer (CPU or GPU)."""

    name = "transformers"

    def __init__(self, model_dir: Path, device: str = "auto", model_id: str | None = None, n_ctx: int | None = None):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        # PreTrainedModel.to is decorated with functools.wraps, which typeshed types as an unbound function
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.n_ctx = n_ctx or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.model_id = model_id or Path(model_dir).name

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> str:
        if not self.tok.chat_template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(prompt, str)  # tokenize=False returns the rendered text
        return prompt

    def generate(self, prompt: str, sp: Sampling) -> Iterator[Piece]:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        torch = self.torch
        ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            ids = torch.tensor([[self.tok.bos_token_id or 0]])
        cancel = threading.Event()

        class _Cancel(StoppingCriteria):  # lets the HTTP side stop generation when a stop string matched
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True, timeout=300)
        greedy = sp.temperature <= 0
        kwargs = dict(
            input_ids=ids.to(self.device),
            attention_mask=torch.ones_like(ids).to(self.device),
            max_new_tokens=sp.max_tokens,
            do_sample=not greedy,
            streamer=streamer,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([_Cancel()]),
            pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
        )
        if not greedy:
            # top_k=0 is off here, not the generation config's default
            kwargs.update(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k)
        result: dict = {}

        def work() -> None:
            try:
                if sp.seed is not None:
                    torch.manual_seed(sp.seed)
                out = self.model.generate(**kwargs)
                result["n_new"] = int(out.shape[1] - ids.shape[1])
                result["eos"] = bool(out[0, -1].item() == self.tok.eos_token_id)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                result["error"] = exc
                streamer.end()

        with self.lock:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            try:
                for text in streamer:
                    if text:
                        yield Piece(text)
            finally:
                cancel.set()
                thread.join()
        if "error" in result:
            raise result["error"]
        hit_eos = result.get("eos") or result.get("n_new", 0) < sp.max_tokens
        yield Piece("", "stop" if hit_eos else "length")


def vllm_argv(
    model: str,
    port: int,
    host: str = "127.0.0.1",
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    quantization: str | None = None,
    served_model_name: str | None = None,
    api_key: str | None = None,
    dtype: str = "auto",
    extra: list[str] | None = None,
) -> list[str]:
    """The `vllm serve` command line (vLLM's own OpenAI server) for one model."""
    argv = [
        "vllm",
        "serve",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--gpu-memory-utilization",
        str(gpu_memory_utilization),
        "--dtype",
        dtype,
    ]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if quantization:
        argv += ["--quantization", quantization]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if api_key:
        argv += ["--api-key", api_key]
    return argv + list(extra or [])
