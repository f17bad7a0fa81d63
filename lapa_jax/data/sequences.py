"""LAPA's VLA token sequences, built on the host: text tokenizers, the prompt, the markers, padding.

    tokenizer = load_tokenizer('bytes')  # or the path of LWM's SentencePiece tokenizer.model
    example = vla_sequence(tokenizer, 'open the drawer', vision_codes, codebook_size=8192, latent=[2, 0, 7, 2])
    batch = pad_batch([example, ...], length=384)  # (batch, 384) arrays, plus attention_mask

Numpy only (no JAX, no TensorFlow): the data pipelines call these functions on the host, and the
modality ids below are the contract between them and the model (`lapa_jax.models.vla` imports them).

A sequence is a list of `(id, modality)` pairs, one id space per modality (text: the LLaMA
SentencePiece ids or bytes; vision: VQGAN codes plus the end-of-frame / end-of-vision ids; latent:
LAQ codes; action: bin indices). The layout is LAPA's (reference/official_lapa.md §2.5):

  <s> <s> You are a helpful assistant. USER: What action should the robot take to `{task}` ASSISTANT:
  <vision> v_1 .. v_n <eov> </vision> <delta> z_1 .. z_k </delta> </s>        (latent pretraining)
  <vision> v_1 .. v_n <eov> </vision> <action> a_1 .. a_7 </action> </s>      (action finetuning)

The markers are ordinary text (a few text tokens each), as in the official data; loss is on
everything from `<delta>` / `<action>` on. Inputs are the sequence without its last token,
targets the sequence without its first: every field of an example is 1-D of length `len(sequence) - 1`.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np

# Modality ids: which embedding table reads an input position, which head scores a target.
TEXT, VISION, LATENT, ACTION = 0, 1, 2, 3
MODALITY_NAMES = ('text', 'vision', 'latent', 'action')

PROMPT = 'You are a helpful assistant. USER: What action should the robot take to `{instruction}` ASSISTANT:'
MARKERS = {VISION: ('<vision>', '</vision>'), LATENT: ('<delta>', '</delta>'), ACTION: ('<action>', '</action>')}


class Tokenizer(Protocol):
  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted by 3 after pad 0, BOS 1, EOS 2 (LLaMA's special ids); needs no files."""
  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode('utf-8')]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """The LLaMA `tokenizer.model` shipped with LWM/LAPA checkpoints (ids: unk/pad 0, BOS 1, EOS 2)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SentencePiece model {path!r} does not exist (expected a tokenizer.model file)')
    import sentencepiece  # Optional dependency: only this tokenizer needs it.
    self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._processor.get_piece_size()
    self.bos_id, self.eos_id = self._processor.bos_id(), self._processor.eos_id()
    self.pad_id = max(self._processor.pad_id(), 0)  # LLaMA has no pad piece; it pads with <unk> = 0.

  def encode(self, text: str) -> list[int]:
    return list(self._processor.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
  """'bytes' for the built-in byte tokenizer, else the path of a SentencePiece `tokenizer.model`."""
  return ByteTokenizer() if spec == 'bytes' else SentencePieceTokenizer(spec)


def lapa_prompt(instruction: str, prompt: str = PROMPT) -> str:
  """The prompt text around an instruction; `prompt` has one '{instruction}' field."""
  return prompt.format(instruction=instruction.strip())


def vision_end_ids(codebook_size: int) -> tuple[int, int]:
  """(end of frame, end of vision) ids, right after the codes (LWM: 8192, 8193)."""
  return codebook_size, codebook_size + 1


def _prefix(tokenizer: Tokenizer, instruction: str, vision_codes: np.ndarray, codebook_size: int, prompt: str):
  """(ids, modality, loss) of BOS, the prompt and the bracketed image; none of it has loss."""
  codes = np.asarray(vision_codes).reshape(-1)
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
    raise ValueError(f'vision codes must lie in [0, {codebook_size}), got [{codes.min()}, {codes.max()}]')
  open_vision, close_vision = (tokenizer.encode(m) for m in MARKERS[VISION])
  # The official instruction text starts with a literal "<s>" that tokenizes to BOS, after the BOS
  # every sequence gets: two BOS ids, which released checkpoints were trained with.
  text = [tokenizer.bos_id, tokenizer.bos_id] + tokenizer.encode(lapa_prompt(instruction, prompt)) + open_vision
  ids = text + [int(c) for c in codes] + [vision_end_ids(codebook_size)[1]] + close_vision
  modality = [TEXT] * len(text) + [VISION] * (codes.size + 1) + [TEXT] * len(close_vision)
  return ids, modality, [0] * len(ids)


def vla_sequence(tokenizer: Tokenizer, instruction: str, vision_codes: np.ndarray, *, codebook_size: int,
                 latent: Sequence[int] | None = None, action: Sequence[int] | None = None,
                 prompt: str = PROMPT) -> dict[str, np.ndarray]:
  """One training example: 1-D arrays `tokens, modality, targets, target_modality, loss_mask`.

  `latent` (LAQ codes) and/or `action` (bin indices) follow the image, each between its markers.
  `vision_codes` may be placeholders (e.g. zeros) that the train step overwrites with the codes of
  an augmented view: they are the first `len(vision_codes)` VISION positions of `tokens`.
  """
  ids, modality, loss = _prefix(tokenizer, instruction, vision_codes, codebook_size, prompt)
  for kind, values in ((LATENT, latent), (ACTION, action)):
    if values is None:
      continue
    open_marker, close_marker = (tokenizer.encode(m) for m in MARKERS[kind])
    values = [int(v) for v in values]
    ids += open_marker + values + close_marker
    modality += [TEXT] * len(open_marker) + [kind] * len(values) + [TEXT] * len(close_marker)
    loss += [1] * (len(open_marker) + len(values) + len(close_marker))
  ids.append(tokenizer.eos_id)
  modality.append(TEXT)
  loss.append(1)
  ids, modality = np.asarray(ids, np.int32), np.asarray(modality, np.int32)
  return dict(tokens=ids[:-1], modality=modality[:-1], targets=ids[1:], target_modality=modality[1:],
              loss_mask=np.asarray(loss[1:], np.float32))


def generation_prompt(tokenizer: Tokenizer, instruction: str, vision_codes: np.ndarray, *, codebook_size: int,
                      target: int = LATENT, prompt: str = PROMPT) -> dict[str, np.ndarray]:
  """1-D `tokens, modality` up to and including the opening marker of `target` (LATENT or ACTION)."""
  if target not in (LATENT, ACTION):
    raise ValueError(f'generation target must be LATENT ({LATENT}) or ACTION ({ACTION}), got {target}')
  ids, modality, _ = _prefix(tokenizer, instruction, vision_codes, codebook_size, prompt)
  open_marker = tokenizer.encode(MARKERS[target][0])
  return dict(tokens=np.asarray(ids + open_marker, np.int32),
              modality=np.asarray(modality + [TEXT] * len(open_marker), np.int32))


def pad_batch(examples: Sequence[dict[str, np.ndarray]], length: int, *, left: bool = False,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Stacks 1-D examples into `(batch, length)` arrays plus `attention_mask` (1 on real tokens).

  Training batches are right-padded; generation prompts are left-padded so that every row's last
  column is its last real token. Examples longer than `length` are an error, never truncated.
  """
  batch: dict[str, np.ndarray] = {}
  for index, example in enumerate(examples):
    size = len(example['tokens'])
    if size > length:
      raise ValueError(f'example {index} has {size} tokens, more than the sequence length {length}')
    start = length - size if left else 0
    for name, values in {**example, 'attention_mask': np.ones(size, np.int32)}.items():
      if name not in batch:
        fill = pad_id if name in ('tokens', 'targets') else 0
        batch[name] = np.full((len(examples), length), fill, np.asarray(values).dtype)
      batch[name][index, start:start + size] = values
  return batch


class TokenBatches:
  """A BatchIterator of padded VLA sequences made from the host batches of a step iterator.

  `make_example(batch, row) -> vla_sequence(...)` builds row `row` of a step batch; the fields named
  in `keep` (e.g. 'image', for a tokenizer that runs on the accelerator) pass through unchanged.
  The data position is the step iterator's, so checkpoints resume it exactly.
  """

  def __init__(self, steps, make_example, length: int, *, keep: Sequence[str] = (), pad_id: int = 0):
    self.steps = steps
    self.make_example = make_example
    self.length = length
    self.keep = tuple(keep)
    self.pad_id = pad_id

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.steps)
    examples = [self.make_example(batch, row) for row in range(len(batch['instruction']))]
    longest = max(len(example['tokens']) for example in examples)
    if longest > self.length:
      raise ValueError(f'config field seq_len: a sequence of this data has {longest} tokens, more than '
                       f'seq_len {self.length}; raise it (or shorten the prompt)')
    return {**pad_batch(examples, self.length, pad_id=self.pad_id), **{key: batch[key] for key in self.keep}}

  def get_state(self):
    return self.steps.get_state()

  def set_state(self, state) -> None:
    self.steps.set_state(state)

  def close(self) -> None:
    getattr(self.steps, 'close', lambda: None)()
