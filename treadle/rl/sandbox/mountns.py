"""A private mount namespace for one sandboxed command: the host read-only, only the sandbox directory writable.

`FsJail.enter()` runs in the child between fork and exec (from `preexec_fn`) and uses the kernel directly
(ctypes; no helper binaries, no extra process):

1. `unshare(CLONE_NEWUSER | CLONE_NEWNS [| CLONE_NEWNET])` and map uid/gid 0 to the caller's, so it works as
   root and, where the kernel allows unprivileged user namespaces, as any user.
2. Every mount becomes private, then read-only recursively (`mount_setattr(AT_RECURSIVE)`; on kernels
   before 5.12, a read-only bind remount of each mount in `/proc/self/mountinfo`, keeping its locked flags).
3. `/tmp`, `/var/tmp`, `/run` and `/dev` are covered by empty tmpfs mounts (read-only after step 4): the
   host's temporary files (other sandboxes, the env's files) are neither readable nor writable there, the
   daemons' Unix sockets under `/run` cannot be connected to, and `/dev` holds only null, zero, full, random
   and urandom (bind-mounted from the host) and an empty `/dev/shm` — no disks, consoles, kvm or fuse.
4. The sandbox directory is bind-mounted at its own path and made writable again; the command's cwd moves
   onto that mount.
5. `/proc` is covered by an empty read-only tmpfs: `/proc/PID/root`, `/proc/PID/cwd` and `/proc/PID/fd` of
   host processes (same uid, so reachable without capabilities) would otherwise lead back to the host's
   writable tree and the env's memory; covering it also denies mounting a fresh procfs.
6. `no_new_privs` and an empty capability bounding set: the command execs with no capabilities, so it can
   neither remount nor unmount. A nested user namespace it may create copies these mounts *locked*
   (read-only and not unmountable), so it cannot undo them either.

A failure raises `OSError` in the child: the command does not start (a tool error), it never runs unconfined.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
# mount_setattr(2) has the same number on every architecture (the unified syscall table, Linux 5.12)
SYS_MOUNT_SETATTR = 442
# covered by empty tmpfs mounts: temporary files (other sandboxes', the env's), /run's daemon sockets, and
# /dev, which gets back only these harmless character devices (bind-mounted from the host's)
COVERED_DIRS = ("/tmp", "/var/tmp", "/run", "/var/run", "/dev")
DEV_NODES = ("null", "zero", "full", "random", "urandom")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox mount namespace: {what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731 - local shorthand
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _set_readonly(path: str, readonly: bool, recursive: bool) -> bool:
    """mount_setattr(2); False when the kernel lacks it (ENOSYS) or a seccomp filter refuses it (EPERM), so
    the caller remounts instead (which fails loudly if it is refused too)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    ret = _libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    if ret != 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        return False
    _check(ret, f"mount_setattr {path}")
    return True


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) for each mount, outermost first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            flags = 0
            for opt in fields[5].split(","):
                flags |= _OPTION_FLAGS.get(opt, 0)
            out.append((_unescape(fields[4]), flags))
    return out


def _remount(point: str, keep: int, readonly: bool) -> None:
    _mount(None, point, None, MS_REMOUNT | MS_BIND | keep | (MS_RDONLY if readonly else 0))


def _flags_of(path: str, mounts: list[tuple[str, int]]) -> int:
    best, keep = "", 0
    for point, flags in mounts:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, keep = point, flags
    return keep


@dataclass(frozen=True)
class FsJail:
    """The mount setup for one command: `root` (a real path) stays writable, everything else is read-only."""

    root: str
    isolate_network: bool = True
    tmpfs_bytes: int = 1 << 20  # the empty tmpfs mounts hold only the sandbox's mount point
    use_mount_setattr: bool = True  # False forces the per-mount remount path (old kernels; tested)

    def enter(self) -> None:
        """Called in the child before exec; raises OSError if any step fails."""
        uid, gid = os.geteuid(), os.getegid()
        cwd = os.getcwd()  # where Popen put us (`root` or a directory in it), by path
        flags = CLONE_NEWUSER | CLONE_NEWNS | (CLONE_NEWNET if self.isolate_network else 0)
        _check(_libc.unshare(flags), "unshare")
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        mounts: list[tuple[str, int]] = []  # read only when remounting one by one (before /proc is covered)
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        dev_fds = {n: os.open(f"/dev/{n}", os.O_PATH) for n in DEV_NODES if os.path.exists(f"/dev/{n}")}
        if not (self.use_mount_setattr and _set_readonly("/", readonly=True, recursive=True)):
            mounts = _mounts()
            for point, keep in mounts:
                if os.path.isdir(point) or os.path.isfile(point):
                    _remount(point, keep, readonly=True)
        covers = []
        for tmp in dict.fromkeys(os.path.realpath(d) for d in COVERED_DIRS):
            if os.path.isdir(tmp):
                _mount(
                    "tmpfs",
                    tmp,
                    "tmpfs",
                    MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    f"size={self.tmpfs_bytes},mode=755",
                )
                covers.append(tmp)
        for name, fd in dev_fds.items():  # /dev is empty now: the device files come back one by one
            if "/dev" in covers:
                os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
                _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
            os.close(fd)
        if "/dev" in covers:
            os.makedirs("/dev/shm", exist_ok=True)  # empty and read-only like the rest
        os.makedirs(self.root, exist_ok=True)  # its mount point, when a tmpfs now covers the real one
        _mount(f"/proc/self/fd/{root_fd}", self.root, None, MS_BIND)
        os.close(root_fd)
        if not (self.use_mount_setattr and _set_readonly(self.root, readonly=False, recursive=False)):
            _remount(self.root, _flags_of(self.root, mounts or _mounts()), readonly=False)
        for tmp in covers:
            _remount(tmp, MS_NOSUID | MS_NODEV | MS_NOEXEC, readonly=True)
        os.chdir(cwd)  # the cwd Popen set still points at the read-only view
        _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4096,mode=555")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        for cap in range(64):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                if ctypes.get_errno() == errno.EINVAL:  # past the last capability this kernel knows
                    break
                _check(-1, f"dropping capability {cap}")
