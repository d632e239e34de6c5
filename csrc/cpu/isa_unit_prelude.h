// First include of an ISA-specific unit (cell_cpu_avx2.cpp, cell_cpu_avx512.cpp), right after
// its target pragma: what every such unit needs before ATen's vector header.
//
// (Each unit also silences, in its own text because GCC only honours it there, the ABI note
// about ATen passing vectors by value: irrelevant, no such function crosses the unit's
// boundary.)
//
// A target pragma does not define the ISA macros that SLEEF's and ATen's headers test, so the
//   AVX2-level ones are stated here (every unit needs at least AVX2 and FMA); a wider unit
//   states its own before including this file.
#pragma once

#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
