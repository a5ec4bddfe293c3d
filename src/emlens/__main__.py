"""`python -m emlens ...` (what `accelerate launch -m emlens train CONFIG.yaml` runs in every process)."""

from emlens.cli import main

if __name__ == "__main__":
    main()
