"""Granularities: kinds of prunable units with their gates (hooks) and physical cuts."""

from aptp.pruners.granularities.attention_heads import AttentionHeads, AttentionHeadsConfig
from aptp.pruners.granularities.depth import Depth, DepthConfig
from aptp.pruners.granularities.ffn import FFN, FFNConfig
from aptp.pruners.granularities.resnet_channels import ResnetChannels, ResnetChannelsConfig

__all__ = ["AttentionHeads", "AttentionHeadsConfig", "Depth", "DepthConfig", "FFN", "FFNConfig",
           "ResnetChannels", "ResnetChannelsConfig"]
