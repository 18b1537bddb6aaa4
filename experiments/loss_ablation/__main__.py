"""`python -m experiments.loss_ablation [flags]`: the study (`--help` lists its stages and flags)."""
from experiments import malloc_tuning
from experiments import simulated_devices
from experiments.loss_ablation import settings


def main(argv=None):
  args = settings.parse_args(argv)
  simulated_devices.simulate_cpu_devices(args.devices, who='loss_ablation')
  # jax reads the simulated device count once, when it is first imported: the study imports it.
  from experiments.loss_ablation import study  # pylint: disable=g-import-not-at-top
  study.run(args)


if __name__ == '__main__':
  malloc_tuning.reexec_if_untuned()  # before the study imports jax
  main()
