"""aptp.backbones"""
