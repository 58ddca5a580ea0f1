"""Default config of ``experiments.proxy_study`` (Frobenius proxy vs data-free Σ).

python -m experiments.proxy_study --config.out=outputs/proxy_study.json
python -m experiments.proxy_study --config.methods=rtn,selfgen_seq --config.eval_num_seqs=4
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Comma list of candidates (see the module docstring of experiments/proxy_study.py):
  # rtn, hadamard, gptq_pydoc, selfgen_seq, selfgen_h, random_h, struct_h, pydoc_h.
  c.methods = 'rtn,hadamard,gptq_pydoc,selfgen_seq,selfgen_h,struct_h'
  c.column = 'w3g128'  # quantizer column, e.g. w3g128
  c.eval_num_seqs = 8  # evaluation windows
  c.eval_seq_len = 512  # tokens per evaluation window
  c.calib_num_seqs = 16  # pydoc calibration windows (gptq_pydoc, diagnosis)
  c.calib_seq_len = 512  # tokens per pydoc calibration window
  c.gen_num_seqs = 16  # self-generated sequences
  c.gen_seq_len = 256  # tokens per self-generated sequence
  c.temperature = 1.0  # sampling temperature of self-generation
  c.start_id = 0  # start token of self-generation (0 = <|endoftext|>)
  c.diagnose = True  # run the diagnosis (a)
  c.seed = 0  # PRNG seed
  c.out = 'outputs/proxy_study.json'  # JSON results path
  return c
