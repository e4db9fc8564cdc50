"""Code shared by the functional-encryption plugins (``fe_inner_product``, ``fe_quadratic``).

What lives here: ``backend`` (the lazy pymcl import, ``availability()`` naming the
``secureinfer[fe]`` extra, ``backend_version()``); ``groups`` (``GroupOps`` adapters that
give G1, G2 and GT one interface: identity, group law, inverse, integer power,
serialization, plus scalar conversion mod the group order and element/scalar packing
that raises ``EnvelopeError`` on malformed bytes); ``dlog`` (``DlogTable``: bounded
baby-step giant-step discrete logarithms in any of those groups, the table cached on disk
and in memory, ``DlogOutOfRange`` instead of a hang); ``tables`` (``FixedBase``: windowed
fixed-base exponentiation for many scalars; ``SmallMatVec``: a group matrix-vector product
with a small integer matrix through per-element windowed tables); ``integer`` (exact
integer affine maps of a quantized linear prefix, from ``secureinfer.quant``, and the
bounds of inner products that size the discrete-log tables).
"""
