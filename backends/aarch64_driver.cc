// Runs one entry of a TVM Relax VM executable (.so) on the CPU, for rehyat_compile.backends.aarch64_qemu.
//
// Usage: aarch64_driver LIBRARY ENTRY INPUT_SPEC OUTPUT_DIR
//   INPUT_SPEC: one line per input tensor, in call order: "<dtype> <ndim> <dim>... <raw file>", e.g.
//               "float32 3 1 16 32 /tmp/x/in0.bin" (row-major, native byte order).
//   OUTPUT_DIR: receives out<i>.bin for every output tensor (a tuple result is flattened depth
//               first) and outputs.txt with one "<dtype> <ndim> <dim>... out<i>.bin" line each.
// Built against TVM 0.27 / tvm-ffi 0.1.15: Module::LoadFromFile loads the executable (the Relax
// VM loader is registered by libtvm_runtime.so, hence --no-as-needed at link time).
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR

struct CPUAlloc {
  void AllocData(DLTensor* tensor) { tensor->data = std::malloc(ffi::GetDataSize(*tensor)); }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open input file " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// One spec line -> a CPU tensor holding the file's bytes (sizes must agree exactly).
ffi::Tensor ReadTensor(const std::string& line) {
  std::istringstream fields(line);
  std::string dtype_name, path;
  int ndim = 0;
  fields >> dtype_name >> ndim;
  std::vector<int64_t> shape(ndim);
  for (auto& dim : shape) fields >> dim;
  fields >> path;
  if (!fields) throw std::runtime_error("bad input spec line: " + line);
  DLDataType dtype = ffi::StringToDLDataType(dtype_name);
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                                DLDevice{kDLCPU, 0});
  std::vector<char> bytes = ReadFile(path);
  size_t expected = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  if (bytes.size() != expected) {
    throw std::runtime_error(path + " holds " + std::to_string(bytes.size()) + " bytes; the spec needs " +
                             std::to_string(expected));
  }
  std::copy(bytes.begin(), bytes.end(), static_cast<char*>(tensor.data_ptr()));
  return tensor;
}

// Writes every tensor of `value` (a tensor or a nested Array of them) in depth-first order.
void WriteOutputs(const ffi::Any& value, const std::string& out_dir, std::ostream& listing, int* count) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    if (!tensor->IsContiguous()) throw std::runtime_error("output tensor is not contiguous");
    std::string name = "out" + std::to_string((*count)++) + ".bin";
    std::ofstream out(out_dir + "/" + name, std::ios::binary);
    out.write(static_cast<const char*>(tensor->data_ptr()), ffi::GetDataSize(*tensor->GetDLTensorPtr()));
    if (!out) throw std::runtime_error("cannot write " + out_dir + "/" + name);
    listing << std::string(ffi::DLDataTypeToString(tensor->dtype())) << " " << tensor->ndim();
    for (int64_t dim : tensor->shape()) listing << " " << dim;
    listing << " " << name << "\n";
  } else if (auto items = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *items) WriteOutputs(item, out_dir, listing, count);
  } else {
    throw std::runtime_error("entry returned a " + value.GetTypeKey() + ", not a tensor or a tuple of them");
  }
}

int Run(const std::string& library, const std::string& entry, const std::string& spec_path,
        const std::string& out_dir) {
  ffi::Module executable = ffi::Module::LoadFromFile(library);
  ffi::Module vm = executable->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  ffi::Optional<ffi::Function> function = vm->GetFunction(entry);
  if (!function.has_value()) throw std::runtime_error("the executable has no function " + entry);

  std::vector<ffi::Tensor> inputs;
  std::ifstream spec(spec_path);
  for (std::string line; std::getline(spec, line);) {
    if (!line.empty()) inputs.push_back(ReadTensor(line));
  }
  std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
  ffi::Any result;
  function.value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);

  std::ofstream listing(out_dir + "/outputs.txt");
  int count = 0;
  WriteOutputs(result, out_dir, listing, &count);
  return listing ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " LIBRARY ENTRY INPUT_SPEC OUTPUT_DIR\n";
    return 2;
  }
  try {
    return Run(argv[1], argv[2], argv[3], argv[4]);
  } catch (const std::exception& err) {
    std::cerr << "aarch64_driver: " << err.what() << "\n";
    return 1;
  }
}
