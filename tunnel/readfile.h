/*
 * readfile: a small configuration file read whole, with its size bounded before anything
 * is allocated. Used for the relay's --manifest, devcontainer.json and authorized_keys.
 */
#ifndef TETHER_READFILE_H
#define TETHER_READFILE_H

#include <stddef.h>

/*
 * Reads the regular file at path, at most max bytes, into a new NUL-terminated buffer
 * (free it); *len gets its length. The file is opened with O_NONBLOCK (a FIFO put in its
 * place cannot hang the caller) and checked with fstat, so what is read is what was
 * checked. Returns NULL with one line in why ("cannot open PATH: ...", "PATH is not a
 * regular file", "PATH is larger than MAX bytes", ...).
 */
char *readfile_bounded(const char *path, size_t max, size_t *len, char *why, size_t whylen);

#endif
