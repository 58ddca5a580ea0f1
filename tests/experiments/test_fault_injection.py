"""The fault-injection script: the main job SIGKILLed at random points stays consistent."""

from __future__ import annotations

from experiments import fault_injection


def test_random_sigkills_leave_every_output_old_or_new_and_complete(tmp_path):
  # Two trials on one column: the reference runs pay the compilation once (the
  # runs share a persistent JAX compilation cache), each restart takes seconds.
  tally = fault_injection.run_trials(
    2, seed=0, workdir=str(tmp_path), columns=('w4g32',), verbose=False
  )
  print(fault_injection.format_tally(tally))
  assert tally['problems'] == [] and tally['final_ok'], tally['problems']
  assert tally['killed'] + tally['finished'] == 2 and tally['failed_runs'] == 0
  assert 'SIGKILLed' in fault_injection.format_tally(tally)
