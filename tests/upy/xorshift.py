# Small deterministic PRNG for MicroPython-side tests (xorshift32): the same on every run and
# cheap on the unix port, for fuzz inputs and simulated channels.


class Rng:
    def __init__(self, seed):
        self.s = seed or 1

    def next(self):
        s = self.s
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self.s = s
        return s

    def random(self):
        return self.next() / 4294967296

    def below(self, n):
        return self.next() % n
