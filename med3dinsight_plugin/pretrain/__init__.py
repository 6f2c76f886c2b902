"""Med3DInsight pretraining: configuration, the training engine (single process or torchrun DDP) and diagnostics.

Typical use::

    from med3dinsight_plugin.pretrain import build_model, load_config, pretrain

    config = load_config("run.yaml", ["train.lr=3e-4"])
    model = build_model(config, embed_dim=512)
    pretrain(config, model, train_set, eval_set, metadata={"teacher": "BiomedCLIP"})
"""
from .config import ConfigError, PretrainConfig, load_config, save_config
from .diagnostics import evaluate, plot_metrics, retrieval_metrics
from .engine import build_model, lr_factor, pretrain

__all__ = ["ConfigError", "PretrainConfig", "build_model", "evaluate", "load_config", "lr_factor", "plot_metrics",
           "pretrain", "retrieval_metrics", "save_config"]
