/* A shared library with a global, for preload_mappings: its .data must be covered once the
 * library is dlopen'ed. */
long counter = 7;
