"""The happynear fork's normalisation epsilon, defined once for its handlers, fusion patterns, layers and stand-ins.

The fork's CPU code adds 1e-6 under every square root it normalises with: Normalize (``normalize_layer.cpp``),
InnerProduct ``normalize: true`` rows (``inner_product_layer.cpp``) and InnerDistance agents
(``inner_distance_layer.cpp``); its GPU code uses 1e-12 or none. The converter follows the CPU code.
"""

#: ``sqrt(sum x^2 + FORK_EPS)``, as the fork's CPU code normalises.
FORK_EPS = 1e-6
