"""Shared fixtures: `tiny_tokenizer`, `stopped_after`, and the settings every test runs under (one thread, a private
cache)."""

from contextlib import contextmanager

import pytest

# Token ids of the tiny tokenizer, fixed so tests can spell out exact expected ids:
#   0 <unk>  1 <s>  2 </s>  3 <|system|>  4 <|user|>  5 <|assistant|>  6 <|tool|>  then TINY_WORDS from id 7.
TINY_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
TINY_WORDS = (
    ": ? . , ! Q A Human Assistant hi there good bad hello what color is the sky it blue green red yes no "
    "how are you fine thanks a b c d e f g h 1 2 3 re I am not sure ok sorry can help with that here answer "
    "question tell me joke why do cats purr"
).split()

# Every turn ends with the EOS token, and the template itself writes the BOS token, so
# `apply_chat_template` must not add another (it tokenizes with add_special_tokens=False).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer():
    """A word-level fast tokenizer built offline: whitespace/punctuation pre-tokenizer, BOS prepended by the
    post-processor ("<s> $A"), EOS "</s>", no pad token, and a chat template whose role markers are tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    # Special tokens are matched before pre-tokenization, so "</s>" or "<|user|>" inside text stays one token.
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE
    )


@contextmanager
def stopped_after(step: int):
    """Runs inside `with stopped_after(step):` are interrupted (a Ctrl-C) once optimizer step `step` is done.

    Patches only `recipe.after_step`, and only for the block: a test's `monkeypatch` (which also holds the private
    cache and thread settings below) is left alone."""
    from preftune import recipe

    def interrupt(done: int) -> None:
        if done == step:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe, "after_step", interrupt)
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Session-wide tiny tokenizer (see `build_tiny_tokenizer`); `pad_token` is None on purpose.
    Do not mutate it in a test: build your own copy with `build_tiny_tokenizer()` instead."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (on 2 cores, a second intra-op thread mostly waits): one, restored
    after. Subprocesses the tests start get OMP_NUM_THREADS=1 for the same reason. Session-wide, so that module
    fixtures (set up before any function's fixtures) run under it too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _private_reference_cache(tmp_path_factory):
    """Cached reference log-probs of tests go to a temporary folder, never the user's cache. Session-wide: a module
    fixture that trained before a function-scoped setting would write to (and read stale files from) the user's
    cache, filled perhaps by other kernels (another ATEN_CPU_CAPABILITY) whose rounding differs. torch.compile's
    kernels likewise: inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY, and a compiled CPU FlexAttention
    kernel cached by an AVX-512 run, reused under ATEN_CPU_CAPABILITY=avx2, gave log-probs up to 0.6 nats off
    (measured on torch 2.13; a fresh cache gives SDPA's numbers)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "reference-cache"))
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor-cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
