"""The fused op: its inputs described once (``args``), the custom ops with their fakes and
autograd (``register``), the launchers (``launch``) with the operand layouts (``layout``) and the
launch policy (``policy``), and the eager math that is the fallback and the test oracle
(``reference``). The Triton kernels themselves are ``zeta_fused.kernels``."""
