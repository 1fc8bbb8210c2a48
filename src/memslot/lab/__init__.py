"""The kernel lab: real Linux kernels (Debian's, 5.10 to 7.3, amd64 / arm64 / riscv64 / ppc64el)
booted under QEMU's full-system emulation, each with KVM inside, so memslot's model can be
checked against every kernel it claims to imitate (``memslot lab``, ``make matrix``).

Modules: :mod:`.targets` (what can be booted), :mod:`.debversion` and :mod:`.archive` (Debian
packages through a private apt configuration), :mod:`.resolve` (which packages a target needs),
:mod:`.cpio` and :mod:`.image` (the boot image), :mod:`.qemu` (booting with timeouts),
:mod:`.session` (build + boot + run, with the retry on a hang), :mod:`.guest` (the side that
runs inside the guest) and :mod:`.matrix` (the proof on every target)."""
