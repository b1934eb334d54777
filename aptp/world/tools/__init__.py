"""Scripts that build the world's shipped assets (``aptp/assets/world``); the library never imports them.

    python -m aptp.world.tools.train_base --out DIR            the base text-to-image model
    python -m aptp.world.tools.train_evaluator --out DIR       the slot-attribute evaluator CNN
    python -m aptp.world.tools.evaluate_base [--base DIR]      a base model's report (eval.json, grid.png)
    python -m aptp.world.tools.evaluator_robustness            the evaluator on degraded renders
"""
