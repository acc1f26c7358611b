// A host program (no GPU needed) that checks the register-layout facts modes 5-8 of relu2_gemm.cu rely on,
// for every configuration the library instantiates, by building the epilogue's own partition of the tile's
// coordinates with CuTe on the host (what Sm90AuxStore / Pack24Store index by) and walking every consumer thread:
//   1. each thread's fragment holds columns in pairs: elements 2p and 2p+1 are one row's columns c, c+1 (c even);
//   2. lane ^ 1 holds the same row's columns c ^ 2, c ^ 2 + 1 at the same index (a 2:4 group = a lane pair), and
//      the even lane holds the group's first two (c % 4 == 0; mode 5 tells the halves apart by lane parity);
//   3. the thread holding row r (r % 16 < 8) of a column pair holds row r + 8 of it too (one metadata byte);
//   4. per subtile each thread holds 16 elements in the accumulator's order: element 4j + 2h + e is row r + 8h,
//      column c0 + 8j + e (j < 4, h, e < 2), with r % 16 < 8 and c0 % 32 == 2 (lane % 4): a warp covers 16 rows x
//      32 columns starting at a multiple of 32 (Pack24Store gathers each row's 32 packed bytes in the quad);
//   5. lane ^ 2 holds the same rows of the same 32-column block (the quad's gathers of chunks and metadata bytes in
//      Pack24Node::store exchange with it).
// Prints one line per configuration and exits non-zero on the first violation.
//   src/elas/kernels/cuda/cutlass/build.sh check   (compiles and runs it; ~3 min)
#include <cstdio>

#include "relu2_gemm.cu"

namespace {

template <class Config>
int check(const char* name) {
  using Mainloop = typename Config::Mainloop;
  using Epilogue = typename Config::Epilogue;
  using TiledMma = typename Mainloop::TiledMma;
  using TileShape = typename Mainloop::TileShape;
  using EpiTile = typename Epilogue::EpilogueTile;
  auto c_atom = make_tiled_copy_C_atom(typename Epilogue::CopyAtomC{}, TiledMma{});
  auto ref = make_tiled_copy_S(Copy_Atom<typename Epilogue::CopyOpR2S, Bf16>{}, c_atom);
  int const M = 2 * size<0>(TileShape{}), N = 2 * size<1>(TileShape{});
  auto coords = make_identity_tensor(make_shape(M, N, 1));
  int const threads = size(TiledMma{});
  int frag = -1;
  for (int tm = 0; tm < 2; ++tm) {
    for (int tn = 0; tn < 2; ++tn) {
      auto tile = make_coord(tm, tn, 0, 0);
      // per thread: (row, col) of each fragment element of every epilogue subtile
      for (int t = 0; t < threads; ++t) {
        auto mine = fusion::sm90_partition_for_epilogue<true>(coords, TileShape{}, tile, EpiTile{}, ref, t);
        auto other = fusion::sm90_partition_for_epilogue<true>(coords, TileShape{}, tile, EpiTile{}, ref, t ^ 1);
        auto pair = fusion::sm90_partition_for_epilogue<true>(coords, TileShape{}, tile, EpiTile{}, ref, t ^ 2);
        for (int em = 0; em < size<3>(mine); ++em) {
          for (int en = 0; en < size<4>(mine); ++en) {
            auto a = mine(_, _, _, em, en);
            auto b = other(_, _, _, em, en);
            auto q = pair(_, _, _, em, en);
            frag = size(a);
            if (size(a) != 16) {
              printf("%s: %d elements per thread per subtile, not 16\n", name, int(size(a)));
              return 1;
            }
            {
              int r0 = get<0>(a(0)), c0 = get<1>(a(0));
              if ((r0 & 15) >= 8 || (c0 & 31) != 2 * ((t % 32) % 4)) {
                printf("%s: thread %d starts at (%d, %d)\n", name, t, r0, c0);
                return 1;
              }
              if (get<0>(q(0)) != r0 || (get<1>(q(0)) & ~31) != (c0 & ~31)) {
                printf("%s: thread %d starts at (%d, %d), lane ^ 2 at (%d, %d): not the same rows and block\n",
                       name, t, r0, c0, int(get<0>(q(0))), int(get<1>(q(0))));
                return 1;
              }
              for (int i = 0; i < 16; ++i) {
                int j = i / 4, h = (i / 2) % 2, e = i % 2;
                if (get<0>(a(i)) != r0 + 8 * h || get<1>(a(i)) != c0 + 8 * j + e) {
                  printf("%s: thread %d element %d is (%d, %d), not (%d, %d)\n", name, t, i, int(get<0>(a(i))),
                         int(get<1>(a(i))), r0 + 8 * h, c0 + 8 * j + e);
                  return 1;
                }
              }
            }
            for (int i = 0; i < size(a); i += 2) {
              int r = get<0>(a(i)), c = get<1>(a(i));
              if (get<0>(a(i + 1)) != r || get<1>(a(i + 1)) != c + 1 || (c & 1)) {
                printf("%s: thread %d element %d: (%d, %d) then (%d, %d), not a column pair\n", name, t, i, r, c,
                       int(get<0>(a(i + 1))), int(get<1>(a(i + 1))));
                return 1;
              }
              if (get<0>(b(i)) != r || get<1>(b(i)) != (c ^ 2) || ((c & 2) != 0) != ((t & 1) != 0)) {
                printf("%s: thread %d element %d at (%d, %d): lane ^ 1 holds (%d, %d)\n", name, t, i, r, c,
                       int(get<0>(b(i))), int(get<1>(b(i))));
                return 1;
              }
              if ((r & 15) < 8) {
                bool found = false;
                for (int j = 0; j < size(a); j += 2) found |= get<0>(a(j)) == r + 8 && get<1>(a(j)) == c;
                if (!found) {
                  printf("%s: thread %d holds (%d, %d) but not (%d, %d)\n", name, t, r, c, r + 8, c);
                  return 1;
                }
              }
            }
          }
        }
      }
    }
  }
  printf("%-24s tile %dx%d, epilogue subtile %dx%d, %d threads, %d elements per thread per subtile: ok\n", name,
         int(size<0>(TileShape{})), int(size<1>(TileShape{})), int(size<0>(EpiTile{})), int(size<1>(EpiTile{})),
         threads, frag);
  return 0;
}

template <class... Configs>
int check_all() {
  int i = 0, bad = 0;
  ((bad |= check<Configs>(kNames[i++])), ...);
  return bad;
}

}  // namespace

int main() {
  int bad = check_all<ELAS_CONFIGS(Pack24Tree)>();
  bad |= check_all<ELAS_CONFIGS(Pack24MaskedTree)>();
  bad |= check_all<ELAS_CONFIGS(Grad24Tag)>();
  bad |= check_all<ELAS_CONFIGS(SteY2sTag)>();
  bad |= check_all<ELAS_CONFIGS(RopeTree)>();
  printf(bad ? "FAILED\n" : "all configurations: the layout facts hold\n");
  return bad;
}
