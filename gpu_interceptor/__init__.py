"""SAIR GPU interceptor: the LD_PRELOAD shim is C (built by this folder's Makefile); this
package only holds the pure-Python reader of its shared-memory counters (`stats`)."""
