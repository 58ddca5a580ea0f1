"""Configuration of a quantization method (``QuantConfig``)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping

from cafeq_jax import quantizer
from cafeq_jax.core import optimize
from cafeq_jax.core import proxy

MATRICES = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
# Matrices stored stacked in one param leaf: selected together or not at all.
LEAF_GROUPS = (('q',), ('k', 'v'), ('o',), ('gate', 'up'), ('down',))
PAIR_KINDS = ('vo', 'qk', 'updown')
PAIR_LOSSES = ('lse', 'product', 'both')
ROUNDINGS = ('rtn', 'gptq')
STATISTICS = ('identity', 'selfgen')
SINGLE_TRANSFORMS = ('learn', 'hadamard')


class Method(str, enum.Enum):
  """Registered methods (``QuantConfig.method`` accepts the enum or its string)."""
  RTN = 'rtn'            # round-to-nearest, no transform
  HADAMARD = 'hadamard'  # fixed random block Hadamard rotation (online) + RTN
  CAFEQ = 'cafeq'        # learned transforms (pairs folded, single online) + rounding
  GPTQ = 'gptq'          # GPTQ with calibration activations (comparison only)


def _spec_from(value: Any) -> quantizer.QuantSpec:
  if isinstance(value, quantizer.QuantSpec):
    return value
  if isinstance(value, Mapping):
    d = dict(value)
    if 'clip_grid' in d:
      d['clip_grid'] = tuple(d['clip_grid'])
    return quantizer.QuantSpec(**d)
  raise TypeError(f'spec must be a QuantSpec or a mapping of its fields; got '
                  f'{type(value).__name__}: {value!r}.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """What to quantize and how.

  Attributes:
    method: one of ``Method`` ('rtn', 'hadamard', 'cafeq', 'gptq').
    spec: the uniform quantizer (bits, group size, symmetric, clip search).
    matrices: which per-layer linears to quantize (subset of ``MATRICES``; 'k'
      and 'v', 'gate' and 'up' share a param leaf and go together).
    block_size: ``k`` of the block-diagonal online transform (divides every
      quantized ``d_in``; a power of two for 'hadamard'; best ``k | g`` or
      ``g | k``).
    transform_init: 'identity' or 'hadamard' init of learned transforms.
    steps: optimisation steps of the single-matrix transforms.
    learning_rate: peak learning rate of those transforms.
    optimizer: 'adam' or 'adamw'.
    schedule: 'cosine' or 'constant'.
    weight_decay: AdamW weight decay.
    log_scale_bound: bound ``c`` of the transforms' log-scales (cond <= e^{4c}).
    learn_scales: learn the diagonal scales of the transforms (else orthogonal).
    right_scales: also learn a right diagonal, ``M = D1 R D2`` (slower steps).
    columns_per_step: optimise transforms on random subsets of this many output
      columns per step (None: all); the full loss is checked every ``eval_every``.
    eval_every: steps between full-loss evaluations when subsampling.
    ste: gradient through the quantizer: 'round' (STE on rounding, scales
      differentiable) or 'full' (``fake_quant``).
    share_transforms: one online transform per param leaf (k/v and gate/up share
      it: one ``x M⁻¹`` per leaf) instead of one per matrix.
    use_single_transforms: cafeq: learn online single-matrix transforms.
    use_pairs: cafeq: fold paired transforms first (``methods.paired``).
    adaptive_rounding: cafeq with pairs: alternating adaptive rounding of the
      pairs (``methods.paired.adaptive_round_pairs``).
    rounding: single matrices under their transform: 'rtn' or 'gptq' (GPTQ-form
      rounding with ``H = M⁻ᵀ Σ M⁻¹``, ``core.rounding.gptq_round``).
    statistics: the input second moment ``Σ`` of the proxy loss
      ``tr(Eᵀ Σ E)``: 'identity' (``Σ ∝ I``: the Frobenius proxy of the paper) or
      'selfgen' (data-free: ``Σ`` of every matrix measured on sequences the fp
      model samples itself from its start token, layer by layer through the
      already-quantized earlier layers; needs ``rounding='gptq'``).
    selfgen_num_seqs, selfgen_seq_len, selfgen_temperature: the self-generated
      sequences of ``statistics='selfgen'``.
    single_transform: online single-matrix transforms: 'learn' (optimised on the
      Frobenius proxy, ``core.optimize``) or 'hadamard' (fixed random block
      Hadamard rotation).
    pairs: which pair kinds to transform ('vo', 'qk', 'updown').
    pair_loss: 'lse' (smooth max of the ranges, the paper), 'product' (STE
      product error) or 'both'.
    pair_steps, pair_learning_rate, pair_temperature: pair optimisation.
    pair_eval_every: steps between evaluations of the actual pair product error.
    ar_rounds: alternations of the pair adaptive rounding.
    ar_solver: rounding inside pair adaptive rounding: 'rtn' or 'gptq'.
    gptq_damp: GPTQ relative damping of ``H``'s diagonal.
    gptq_act_order: GPTQ-form rounding sweeps the rows by decreasing ``H_ii``
      (static group scales); see ``core.rounding.gptq_round``.
    seed: PRNG seed used when ``quantize`` gets no key.
    progress: show progress bars.
  """

  method: Method = Method.CAFEQ
  spec: quantizer.QuantSpec = dataclasses.field(
      default_factory=lambda: quantizer.QuantSpec(bits=4, group_size=128))
  matrices: tuple[str, ...] = MATRICES
  block_size: int = 64
  transform_init: str = 'identity'
  steps: int = 150
  learning_rate: float = 2e-3
  optimizer: str = 'adam'
  schedule: str = 'cosine'
  weight_decay: float = 0.0
  log_scale_bound: float = 0.5
  learn_scales: bool = True
  right_scales: bool = False
  columns_per_step: int | None = 256
  eval_every: int = 10
  ste: str = 'round'
  share_transforms: bool = False
  use_single_transforms: bool = True
  use_pairs: bool = False
  adaptive_rounding: bool = False
  rounding: str = 'rtn'
  statistics: str = 'identity'
  selfgen_num_seqs: int = 32
  selfgen_seq_len: int = 256
  selfgen_temperature: float = 1.0
  single_transform: str = 'learn'
  pairs: tuple[str, ...] = PAIR_KINDS
  pair_loss: str = 'lse'
  pair_steps: int = 200
  pair_learning_rate: float = 5e-3
  pair_temperature: float = 0.05
  pair_eval_every: int = 5
  ar_rounds: int = 3
  ar_solver: str = 'gptq'
  gptq_damp: float = 0.01
  gptq_act_order: bool = False
  seed: int = 0
  progress: bool = False

  def __post_init__(self):
    try:
      method = Method(self.method)
    except ValueError:
      raise ValueError(f'method={self.method!r} is not supported; expected one of '
                       f'{[m.value for m in Method]}.') from None
    object.__setattr__(self, 'method', method)
    object.__setattr__(self, 'spec', _spec_from(self.spec))
    if isinstance(self.matrices, str):
      raise TypeError(f'matrices must be a sequence of names, not the string '
                      f'{self.matrices!r}; e.g. ("q", "k", "v").')
    matrices = tuple(self.matrices)
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown or not matrices or len(set(matrices)) != len(matrices):
      raise ValueError(f'matrices={matrices!r} must be a non-empty subset of '
                       f'{MATRICES} without repeats (unknown: {unknown}).')
    for group in LEAF_GROUPS:
      chosen = [m for m in group if m in matrices]
      if chosen and len(chosen) != len(group):
        raise ValueError(
            f'matrices {group} share one param leaf and must be quantized together; '
            f'got {chosen} without {[m for m in group if m not in chosen]}.')
    object.__setattr__(self, 'matrices', tuple(m for m in MATRICES if m in matrices))
    object.__setattr__(self, 'pairs', tuple(self.pairs))
    bad = [p for p in self.pairs if p not in PAIR_KINDS]
    if bad:
      raise ValueError(f'pairs={self.pairs!r} has unknown kinds {bad}; expected a '
                       f'subset of {PAIR_KINDS}.')
    if self.pair_loss not in PAIR_LOSSES:
      raise ValueError(f'pair_loss={self.pair_loss!r}; expected one of {PAIR_LOSSES}.')
    for name in ('rounding', 'ar_solver'):
      if getattr(self, name) not in ROUNDINGS:
        raise ValueError(f'{name}={getattr(self, name)!r}; expected one of {ROUNDINGS}.')
    if self.statistics not in STATISTICS:
      raise ValueError(f'statistics={self.statistics!r}; expected one of {STATISTICS}.')
    if self.single_transform not in SINGLE_TRANSFORMS:
      raise ValueError(f'single_transform={self.single_transform!r}; expected one of '
                       f'{SINGLE_TRANSFORMS}.')
    for name, least in (('selfgen_num_seqs', 1), ('selfgen_seq_len', 2)):
      v = getattr(self, name)
      if not isinstance(v, int) or v < least:
        raise ValueError(f'{name}={v!r} must be an int >= {least}.')
    if not self.selfgen_temperature > 0:
      raise ValueError(f'selfgen_temperature={self.selfgen_temperature!r} must be > 0.')
    if self.ste not in proxy.STE_MODES:
      raise ValueError(f'ste={self.ste!r}; expected one of {proxy.STE_MODES}.')
    if not isinstance(self.pair_eval_every, int) or self.pair_eval_every < 1:
      raise ValueError(f'pair_eval_every={self.pair_eval_every!r} must be a positive int.')
    for name in ('pair_steps', 'ar_rounds', 'seed'):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 0:
        raise ValueError(f'{name}={v!r} must be an int >= 0.')
    for name in ('pair_learning_rate', 'pair_temperature'):
      if not getattr(self, name) > 0:
        raise ValueError(f'{name}={getattr(self, name)!r} must be > 0.')
    if not 0 <= self.gptq_damp < 1:
      raise ValueError(f'gptq_damp={self.gptq_damp!r} must be in [0, 1).')
    if self.method == Method.HADAMARD and self.block_size & (self.block_size - 1):
      raise ValueError(f'method=hadamard needs a power-of-two block_size; got '
                       f'{self.block_size}.')
    if self.method == Method.CAFEQ:
      if not (self.use_single_transforms or self.use_pairs or self.adaptive_rounding
              or self.rounding != 'rtn'):
        raise ValueError(
            'method=cafeq with use_single_transforms=False, use_pairs=False, '
            "adaptive_rounding=False and rounding='rtn' is plain RTN; use method='rtn'.")
      if self.statistics == 'selfgen' and self.rounding != 'gptq':
        raise ValueError("statistics='selfgen' enters through GPTQ-form rounding; set "
                         "rounding='gptq'.")
      if self.statistics == 'selfgen' and self.adaptive_rounding:
        raise ValueError("statistics='selfgen' rounds every matrix (pairs included) "
                         "under its self-generated Σ; set adaptive_rounding=False (pair "
                         "adaptive rounding uses the Frobenius product proxy).")
      if self.adaptive_rounding and not self.use_pairs:
        raise ValueError('adaptive_rounding=True rounds transformed pairs and needs '
                         'use_pairs=True (single matrices: set rounding="gptq").')
    self.transform_config()  # validates the transform fields

  def transform_config(self, init: str | None = None) -> optimize.TransformConfig:
    """The ``core.optimize.TransformConfig`` of the single-matrix transforms."""
    return optimize.TransformConfig(
        block_size=self.block_size, init=init or self.transform_init,
        optimizer=self.optimizer, learning_rate=self.learning_rate, steps=self.steps,
        schedule=self.schedule, weight_decay=self.weight_decay,
        log_scale_bound=self.log_scale_bound, learn_scales=self.learn_scales,
        right_scales=self.right_scales, columns_per_step=self.columns_per_step,
        eval_every=self.eval_every, ste=self.ste)

  def replace(self, **kwargs) -> QuantConfig:
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    """Plain (JSON/ml_collections-friendly) dict; inverse of ``from_dict``."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d['method'] = self.method.value
    d['spec'] = dataclasses.asdict(self.spec)
    d['spec']['clip_grid'] = list(self.spec.clip_grid)
    for k in ('matrices', 'pairs'):
      d[k] = list(d[k])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
    """From a mapping (e.g. an ``ml_collections.ConfigDict.to_dict()``)."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f'unknown QuantConfig fields {unknown}; expected some of '
                       f'{sorted(names)}.')
    for k in ('matrices', 'pairs'):
      if k in d and not isinstance(d[k], str):
        d[k] = tuple(d[k])
    return cls(**d)
