// Writes the Java-serialized fixtures of rapid-vmm's import tests with the
// real ObjectOutputStream: `javac -d out $(find . -name '*.java') &&
// java -cp out MakeFixtures ..` (run from this directory).
import eu.rapid.vmm.*;
import java.io.*;
import java.lang.reflect.Field;
import java.util.*;

public class MakeFixtures {
    static void set(Object o, String name, Object value) throws Exception {
        Field f = o.getClass().getDeclaredField(name);
        f.setAccessible(true);
        f.set(o, value);
    }

    static void write(String dir, String name, Object o) throws Exception {
        try (ObjectOutputStream out = new ObjectOutputStream(
                new FileOutputStream(new File(dir, name)))) {
            out.writeObject(o);
        }
    }

    static VmInfo vm(String name, long vmid, long user, int status) throws Exception {
        VmInfo vm = new VmInfo();
        set(vm, "vmName", "Created domain " + name);
        set(vm, "vmIdByLM", name);
        set(vm, "vmid", vmid);
        set(vm, "vcpuNum", 1);
        set(vm, "memSize", 1024);
        set(vm, "diskSize", 20);
        set(vm, "userid", user);
        set(vm, "status", status);
        set(vm, "vmImagePath", "/home/rapid/vm_images/" + name + ".img");
        set(vm, "ipAddress", "192.168.122.40");
        set(vm, "asSync", true);
        return vm;
    }

    public static void main(String[] args) throws Exception {
        String dir = args[0];
        // The original's list is Collections.synchronizedList(...) whenever
        // the VMM started without a vmList.out (and stays one afterwards).
        List<VmInfo> vms = Collections.synchronizedList(new ArrayList<VmInfo>());
        vms.add(vm("RAPID_VM_5", 105, 77, 1));
        write(dir, "vmList-synchronized.out", vms);

        VmmInfo info = new VmmInfo();
        set(info, "vmmId", 12L);
        List<String> pool = Collections.synchronizedList(new ArrayList<String>());
        pool.add("/home/rapid/vm_images/RAPID_VM_6.img");
        set(info, "vmImageFreeList", pool);
        SlamInfo slam = new SlamInfo();
        set(slam, "ipv4", "10.0.0.9");
        set(slam, "port", 9002);
        set(info, "slamInfo", slam);
        write(dir, "vmmInfo-synchronized.out", info);

        // Not the original's classes: a map, a list of another class, an
        // object whose readObject would run a command if it were loaded.
        Map<String, Integer> map = new HashMap<>();
        map.put("vmmId", 7);
        write(dir, "other-hashmap.out", map);
        List<Object> mixed = new ArrayList<>();
        mixed.add(new Evil());
        write(dir, "vmList-evil.out", mixed);
        write(dir, "vmmInfo-evil.out", new Evil());
    }
}
