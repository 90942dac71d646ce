"""The writers, one per container (``bnb.py``, ``compressed.py``, ``gguf.py``, on ``base.py``'s
``Sink``). Which one writes a plan is the container registry's answer: ``qtool.containers.sink_class``.
"""
