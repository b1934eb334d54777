"""The embedded default world: procedural captioned images (`aptp.data.world`), a small pretrained
pixel-space text-to-image base model (`aptp.world.model`, trained by `aptp.world.train_base`) and an
attribute evaluator (`aptp.world.evaluator`), the world's analogue of CLIP score / FID / CMMD."""
