"""``python -m calibrl.integrations.verl_main [Hydra overrides]``: verl 0.9.1's
``python -m verl.trainer.main_ppo`` (its default V1 trainer, verl's own config) with CalibRL's
actor worker and expert pass (:func:`calibrl.integrations.verl.main`)."""

import os

from calibrl.integrations import verl as calibrl_verl

try:
    import hydra
    import verl
except ModuleNotFoundError as e:
    raise calibrl_verl._missing("calibrl.integrations.verl_main", e) from e

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@hydra.main(config_path=CONFIG_DIR, config_name="ppo_trainer", version_base=None)
def main(config):
    calibrl_verl.main(config)


if __name__ == "__main__":
    main()
