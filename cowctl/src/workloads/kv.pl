# A key-value cache in Perl: the real-program workload of `cowctl bench --speculate`.
# Usage: perl kv.pl [OPS]. Prints a checksum of the final store.
#
# 20 000 keys; 90 % of the operations go to a hot 5 % of them (gets and sets whose values
# change size, so Perl reallocates them), the rest anywhere; every 500 operations one key is
# evicted and a new one inserted. Deterministic (own LCG), so every run does the same work.
use strict;
use warnings;

my $ops = shift // 300_000;
my $n_keys = 20_000;
my $hot = $n_keys / 20;
my @keys = map { "key:$_" } 0 .. $n_keys - 1;
my %store = map { $_ => "v" x 64 } @keys;
my %hits;

my $seed = 42;
sub rnd { $seed = ($seed * 1103515245 + 12345) % 2147483648; return $seed >> 4 }

for my $i (1 .. $ops) {
    my $r = rnd();
    my $k = ($r % 10) ? $keys[$r % $hot] : $keys[$r % $n_keys];
    if ($r & 16) {
        $store{$k} = "$i:" . ("x" x (16 + ($r >> 6) % 240));
    } else {
        my $v = $store{$k} // "";
        $hits{$k}++ if length $v;
    }
    if ($i % 500 == 0) {
        my $victim = $keys[$r % $n_keys];
        delete $store{$victim};
        $store{"$victim:$i"} = "n" x 64;
    }
}

my $sum = 0;
$sum = ($sum * 31 + length($_) + length($store{$_})) % 1_000_000_007 for sort keys %store;
print "keys ", scalar(keys %store), " hot ", scalar(keys %hits), " checksum $sum\n";
