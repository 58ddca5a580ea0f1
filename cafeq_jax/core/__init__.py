"""Pure math of the CafeQ method: transforms, proxy losses, optimisation, rounding.

Modules know nothing about models or files; ``cafeq_jax.methods`` maps a model's
parameter tree onto them.
"""
