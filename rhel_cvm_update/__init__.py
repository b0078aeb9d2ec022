"""rhel-cvm-update: keep a vTPM-unlocked LUKS2 root unlocking across UKI kernel updates."""

__version__ = "0.1.0"
