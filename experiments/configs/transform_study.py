"""Config of the learned-transform ablation (``python -m experiments.transform_study``).

python -m experiments.transform_study
python -m experiments.transform_study --config.variants=rtn,dense --config.texts=pydoc

``VARIANTS`` names each row's changes to the ``cafeq-single`` preset's
``TransformConfig``; every row quantizes all linears of the model with
``cafeq-single`` (learned online transforms on the Frobenius proxy, RTN rounding;
reads no data) under that transform, except ``rtn`` (no transform).
"""

import ml_collections

# Rows of the ablation: name -> fields changed from the cafeq-single preset's
# TransformConfig (dense blocks from the identity, Adam, peak lr 2e-2 with cosine
# decay, 150 steps, 256 random output columns per step, k = 64, 'round' STE);
# None: plain RTN. The optional key 'rounding': 'gptq' rounds V = M W in GPTQ form
# under H = M⁻ᵀ M⁻¹ (GPTQ(statistics=Frobenius()): still the Frobenius proxy, reads
# no data). In the order they run (the study resumes row by row).
VARIANTS = {
  'rtn': None,
  'cafeq-single': {},  # the preset as it is
  # The rotation x bounded diagonals and the learning rate of earlier releases, as
  # the main job ran it (50 steps).
  'rotation-lr2e-3-50': dict(parameterization='rotation', learning_rate=2e-3, steps=50),
  'dense-lr2e-3': dict(learning_rate=2e-3),
  'dense-lr2e-3-constant': dict(learning_rate=2e-3, schedule='constant'),
  'dense-lr5e-2': dict(learning_rate=5e-2),
  'rotation': dict(parameterization='rotation'),
  'lu': dict(parameterization='lu'),
  'dense-gptq': dict(rounding='gptq'),
  'dense-all-columns': dict(columns_per_step=None),
  'dense-k32': dict(block_size=32),
  'dense-k128': dict(block_size=128),
  'dense-ste-full': dict(ste='full'),
  # Wider bounds: log-scales up to 2 on both sides (cond <= e^8).
  'rotation-wide': dict(parameterization='rotation', log_scale_bound=2.0, right_scales=True),
  'dense-300': dict(steps=300),
}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'smollm2_135m'
  c.variants = ','.join(VARIANTS)  # rows, in order (names of VARIANTS)
  c.column = 'w3g128'  # the quantizer, as the main job's columns
  c.texts = 'pydoc,speeches'  # evaluation texts (cafeq_jax.eval.data.TEXTS)
  c.eval_num_seqs = 8
  c.eval_seq_len = 512
  c.eval_batch_size = 2
  c.seed = 0
  # A matrix name (q, k, v, o, gate, up, down): optimise only that matrix of every
  # layer and record the proxy and time, no perplexity (quick optimiser studies).
  c.matrix = ''
  c.output_dir = 'outputs/transform_study'  # results.json (resumable) and table.md
  return c
