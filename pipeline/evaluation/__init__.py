"""Measuring what training did, honestly: win rates with intervals and length control, reply
statistics that expose reward hacking, and the plain-words verdict built from them.

Pure functions on tensors and dicts: the eval and PPO stages call them, the tests check them
against hand-computed values.
"""
