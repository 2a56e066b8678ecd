"""The simulation engine: programs, devices, statevectors, execution. It never imports Qiskit."""
