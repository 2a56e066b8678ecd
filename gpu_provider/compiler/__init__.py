"""Front-end compilers: Qiskit circuits to engine programs, and gate fusion."""
